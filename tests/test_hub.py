"""hub.py's claims: downloads resume, verify and never leave a half file under its name; presets
come from the hub only when the hub's published sha256 matches; the SMS Spam Collection is
extracted, verified and cached; files are written whole."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import gpt
import hub
from gpt import GPTConfig

FIXTURES = Path(__file__).parent / "fixtures"
TINY = GPTConfig(vocab_size=1000, context_length=64, emb_dim=64, n_layers=2, n_heads=4)  # the fixture's


# --------------------------------------------------------------------------- downloads


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files`, honouring Range unless told not to, and can cut a body short."""

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_HEAD(self) -> None:
        self.server.requests.append(("HEAD", self.path, self.headers.get("Range")))
        if self.path not in self.server.hub_headers:
            self.send_error(404)
            return
        self.send_response(302)  # like the hub: a redirect to the CDN carrying the file's sha256
        for name, value in self.server.hub_headers[self.path].items():
            self.send_header(name, value)
        self.end_headers()

    def do_GET(self) -> None:
        server = self.server
        server.requests.append(("GET", self.path, self.headers.get("Range")))
        if self.path in server.hub_headers:
            self.send_response(302)
            self.send_header("Location", server.hub_headers[self.path]["Location"])
            self.end_headers()
            return
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, asked = 0, self.headers.get("Range")
        if asked and server.honour_range:
            start = int(asked.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if server.cut_after is not None:  # one broken response: part of the body, then hang up
            payload, server.cut_after = payload[: server.cut_after], None
        if server.trickle is None:
            self.wfile.write(payload)
            return
        piece, pause = server.trickle  # a slow server: `piece` bytes, then a pause, over and over
        for start in range(0, len(payload), piece):
            self.wfile.write(payload[start : start + piece])
            self.wfile.flush()
            time.sleep(pause)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.hub_headers, httpd.requests = {}, {}, []
    httpd.honour_range, httpd.cut_after, httpd.trickle = True, None, None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


CONTENT = bytes(range(256)) * 40  # 10,240 bytes
CONTENT_SHA256 = hashlib.sha256(CONTENT).hexdigest()


def test_fresh_download_is_verified_and_reports_progress(server, tmp_path):
    server.files["/data.bin"] = CONTENT
    calls = []
    dest = hub.download(
        f"{server.url}/data.bin",
        tmp_path / "sub" / "data.bin",
        CONTENT_SHA256,
        lambda d, t: calls.append((d, t)),
    )
    assert dest.read_bytes() == CONTENT
    assert calls[0] == (0, len(CONTENT)) and calls[-1] == (len(CONTENT), len(CONTENT))
    assert server.requests == [("GET", "/data.bin", None)]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.bin"]  # no .part left


@pytest.mark.parametrize("cut_after", [0, 1, 5000, len(CONTENT) - 1])
@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "server ignores range"])
def test_a_cut_download_resumes_to_the_identical_file(server, tmp_path, cut_after, honour_range):
    server.files["/data.bin"] = CONTENT
    server.cut_after = cut_after
    dest = tmp_path / "data.bin"
    with pytest.raises(ConnectionError, match=f"{server.url}/data.bin"):
        hub.download(f"{server.url}/data.bin", dest, CONTENT_SHA256)
    assert not dest.exists()
    assert (tmp_path / "data.bin.part").read_bytes() == CONTENT[:cut_after]  # kept for the next try
    server.honour_range = honour_range
    hub.download(f"{server.url}/data.bin", dest, CONTENT_SHA256)
    assert dest.read_bytes() == CONTENT
    assert server.requests[1] == ("GET", "/data.bin", f"bytes={cut_after}-" if cut_after else None)
    assert not (tmp_path / "data.bin.part").exists()


def test_a_partial_file_that_is_already_complete_is_verified_not_refetched(server, tmp_path):
    server.files["/data.bin"] = CONTENT
    (tmp_path / "data.bin.part").write_bytes(CONTENT)
    hub.download(f"{server.url}/data.bin", tmp_path / "data.bin", CONTENT_SHA256)
    assert (tmp_path / "data.bin").read_bytes() == CONTENT
    assert server.requests == [("GET", "/data.bin", f"bytes={len(CONTENT)}-")]  # answered 416


def test_a_hash_mismatch_is_an_error_and_leaves_no_file(server, tmp_path):
    server.files["/data.bin"] = CONTENT
    dest = tmp_path / "data.bin"
    with pytest.raises(ValueError, match="sha256"):
        hub.download(f"{server.url}/data.bin", dest, "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_a_second_call_makes_no_request(server, tmp_path):
    server.files["/data.bin"] = CONTENT
    dest = hub.download(f"{server.url}/data.bin", tmp_path / "data.bin", CONTENT_SHA256)
    server.files.clear()
    assert hub.download(f"{server.url}/data.bin", dest, CONTENT_SHA256) == dest
    assert len(server.requests) == 1


def test_network_failures_are_connection_errors_naming_the_url(server, tmp_path):
    with pytest.raises(ConnectionError, match=r"/missing\.bin: HTTP 404"):
        hub.download(f"{server.url}/missing.bin", tmp_path / "x")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}/x.bin.*refused"):
        hub.download(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


HUB_PATH = "/openai-community/gpt2/resolve/main/model.safetensors"
TINY_HUB_FILE = FIXTURES / "hf_tiny_hub.safetensors"


def serve_tiny_preset(server, etag: str | None) -> bytes:
    """Serve the tiny hub-style fixture as if it were gpt2-small on the hub."""
    body = TINY_HUB_FILE.read_bytes()
    server.files["/cdn/model.safetensors"] = body
    cdn = server.url.replace("127.0.0.1", "localhost") + "/cdn/model.safetensors"  # another host
    server.hub_headers[HUB_PATH] = {"Location": cdn, "X-Linked-Size": str(len(body))}
    if etag is not None:
        server.hub_headers[HUB_PATH]["X-Linked-Etag"] = etag
    return body


def test_a_preset_downloads_once_verified_by_the_hubs_sha256(server, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_HUB_URL", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    body = serve_tiny_preset(server, f'"{hub.file_sha256(TINY_HUB_FILE)}"')  # quoted, as the hub sends it
    progress = []
    path = hub.fetch("gpt2-small", cache_dir=tmp_path, progress=lambda d, t: progress.append((d, t)))
    model = gpt.load_gpt2(path, config=TINY)
    reference = gpt.read_safetensors(FIXTURES / "hf_tiny_logits.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(reference["input_ids"]), reference["logits"], rtol=0, atol=1e-5)
    assert (tmp_path / "gpt2-small" / "model.safetensors").read_bytes() == body
    assert progress[-1] == (len(body), len(body))
    assert [(method, path) for method, path, _ in server.requests] == [
        ("HEAD", HUB_PATH),
        ("GET", HUB_PATH),
        ("GET", "/cdn/model.safetensors"),
    ]
    assert hub.fetch("gpt2-small", cache_dir=tmp_path) == path
    assert len(server.requests) == 3  # the cached file: no request at all


@pytest.mark.parametrize(
    "etag, message",
    [(None, "X-Linked-Etag"), ('"' + "ab" * 32 + '"', "sha256")],
    ids=["no sha256", "wrong sha256"],
)
def test_a_preset_that_cannot_be_verified_is_refused(server, tmp_path, monkeypatch, etag, message):
    monkeypatch.setenv("GPT2_HUB_URL", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    serve_tiny_preset(server, etag)
    with pytest.raises(ValueError, match=message):
        hub.fetch("gpt2-small", cache_dir=tmp_path)
    assert list(tmp_path.rglob("*.safetensors*")) == []


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2_CLASSIFICATION_CACHE", str(tmp_path / "mine"))
    assert hub.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GPT2_CLASSIFICATION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.default_cache_dir() == tmp_path / "xdg" / "gpt2-classification"


def test_print_progress_rewrites_one_line_and_ends_it(capsys):
    hub.print_progress(0, 2_000_000)
    hub.print_progress(2_000_000, 2_000_000)
    hub.print_progress(5_000_000, None)
    err = capsys.readouterr().err
    assert err.count("\r") == 3 and err.count("\n") == 1 and "100%" in err


# --------------------------------------------------------------------------- hostile servers and caches


def test_two_downloads_into_one_cache_end_with_one_verified_file(server, tmp_path):
    """Two runs fetching the same file into one cache take turns: the second finds the first one's
    verified file; no bytes are ever written twice into one partial file."""
    server.files["/data.bin"] = CONTENT
    server.trickle = (2048, 0.02)  # slow enough that both are in flight together
    dest, results = tmp_path / "data.bin", []

    def fetch():
        try:
            results.append(hub.download(f"{server.url}/data.bin", dest, CONTENT_SHA256))
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            results.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [dest, dest]
    assert dest.read_bytes() == CONTENT and hub.file_sha256(dest) == CONTENT_SHA256
    assert [request for request in server.requests if request[0] == "GET"] == [("GET", "/data.bin", None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_a_partial_file_that_is_a_symlink_is_never_written_through(server, tmp_path):
    server.files["/data.bin"] = CONTENT
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "data.bin.part").symlink_to(victim)
    with pytest.raises(ValueError, match="symbolic link"):
        hub.download(f"{server.url}/data.bin", tmp_path / "data.bin", CONTENT_SHA256)
    assert victim.read_text() == "precious" and not (tmp_path / "data.bin").exists()


def test_a_server_that_trickles_bytes_is_given_up_on(server, tmp_path, monkeypatch):
    """Each read arrives within the timeout, but the download as a whole is too slow."""
    monkeypatch.setattr(hub, "SLOW_WINDOW_SECONDS", 0.3)
    monkeypatch.setattr(hub, "MIN_BYTES_PER_WINDOW", 5000)
    server.files["/data.bin"] = CONTENT
    server.trickle = (100, 0.05)  # 2,000 bytes/s
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="too slow"):
        hub.download(f"{server.url}/data.bin", tmp_path / "data.bin", CONTENT_SHA256)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "data.bin").exists()


def test_an_archive_that_inflates_to_far_more_is_read_no_further_than_the_file(server, tmp_path):
    """A zip bomb in place of the SMS archive: 64 MB of zeros, about 60 KB compressed. The reader
    stops one byte past the collection's size, and nothing is cached."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("SMSSpamCollection", b"\0" * (64 * 2**20))
    server.files["/sms.zip"] = archive.read_bytes()
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"has {hub.SMS_SPAM_SIZE + 1} bytes"):
        hub.download_sms_spam(cache, url=f"{server.url}/sms.zip")
    assert list((cache / "sms_spam").iterdir()) == []


def test_printable_escapes_what_could_drive_a_terminal():
    assert hub.printable("ok \x1b[31mred\x07 \u202eevil\udcff é 😀\n") == "ok \\x1b[31mred\\x07 \\u202eevil\\udcff é 😀\\n"
    assert hub.printable("two\nlines\t", keep="\n") == "two\nlines\\t"



# --------------------------------------------------------------------------- the Hugging Face cache

COMMIT = "607a30d783dfa663caf39e06633721c8d4cfcd7e"


def hf_cache_entry(cache: Path, repo_folder: str, commit: str = COMMIT, refs_main: bool = True,
                   blob_name: str | None = None) -> Path:
    """What huggingface_hub leaves after downloading model.safetensors: the bytes in blobs/ under
    their sha256, a link to them in snapshots/<commit>/, and refs/main naming the commit."""
    folder = cache / repo_folder
    blob = folder / "blobs" / (blob_name or hub.file_sha256(TINY_HUB_FILE))
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(TINY_HUB_FILE.read_bytes())
    link = folder / "snapshots" / commit / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    if refs_main:
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
    return link


@pytest.fixture
def no_network(server, monkeypatch):
    """A hub that answers nothing (404 to every request), so a download attempt is seen and fails."""
    monkeypatch.setenv("GPT2_HUB_URL", server.url)
    return server


@pytest.mark.parametrize("repo_folder", ["models--openai-community--gpt2", "models--gpt2"])
def test_a_preset_in_the_hugging_face_cache_loads_without_a_download(tmp_path, monkeypatch, no_network, repo_folder):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    link = hf_cache_entry(tmp_path / "hf", repo_folder)
    path = hub.fetch("gpt2-small", cache_dir=tmp_path / "ours")
    assert path == link and no_network.requests == []
    reference = gpt.read_safetensors(FIXTURES / "hf_tiny_logits.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(gpt.load_gpt2(path, config=TINY)(reference["input_ids"]), reference["logits"],
                                   rtol=0, atol=1e-5)
    assert hub.find_in_hf_cache("gpt2-medium") is None  # another preset is another repository


def test_refs_main_wins_then_the_newest_snapshot(tmp_path):
    older = hf_cache_entry(tmp_path, "models--openai-community--gpt2", "1" * 40, refs_main=False, blob_name="a" * 64)
    newer = hf_cache_entry(tmp_path, "models--openai-community--gpt2", "2" * 40, refs_main=False, blob_name="b" * 64)
    os.utime(older.resolve(), (1, 1))
    os.utime(newer.resolve(), (3, 3))
    assert hub.find_in_hf_cache("gpt2-small", tmp_path) == newer
    refs_main = tmp_path / "models--openai-community--gpt2" / "refs" / "main"
    refs_main.parent.mkdir()
    refs_main.write_text("1" * 40 + "\n")
    assert hub.find_in_hf_cache("gpt2-small", tmp_path) == older
    refs_main.write_text("../../../../tmp")
    assert hub.find_in_hf_cache("gpt2-small", tmp_path) == newer  # a ref that is not a commit is ignored


def test_our_own_cache_comes_first_and_a_dangling_link_is_no_file(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    link = hf_cache_entry(tmp_path / "hf", "models--openai-community--gpt2")
    ours = tmp_path / "ours" / "gpt2-small" / "model.safetensors"
    ours.parent.mkdir(parents=True)
    ours.write_bytes(TINY_HUB_FILE.read_bytes())
    assert hub.fetch("gpt2-small", cache_dir=tmp_path / "ours") == ours
    ours.unlink()
    link.resolve().unlink()  # the blob deleted by hand: the link points nowhere
    assert hub.find_in_hf_cache("gpt2-small") is None
    with pytest.raises(ConnectionError):
        hub.fetch("gpt2-small", cache_dir=tmp_path / "ours")  # so it downloads (and here the hub answers 404)
    assert no_network.requests


def test_the_hugging_face_cache_is_found_by_huggingface_hubs_rule(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.hf_hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hf_hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hub.hf_hub_cache() == tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert hub.hf_hub_cache() == tmp_path / "hub-cache"


def test_the_main_job_says_which_weights_file_it_read(tmp_path, monkeypatch, no_network):
    import train

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    link = hf_cache_entry(tmp_path / "hf", "models--openai-community--gpt2")
    lines = []
    cfg = train.TrainConfig(model="gpt2-small", cache_dir=str(tmp_path / "ours"))
    model = train.load_gpt(cfg, TINY, lines.append)
    assert lines == [f"3. GPT: weights from {link}"] and no_network.requests == []
    assert model.cfg == TINY
