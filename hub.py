"""Files from the outside world, fetched and written safely: machinery the chapter never mentions.

- downloads: GPT-2's weights from the Hugging Face hub (`fetch`) and the SMS Spam Collection from
  UCI (`download_sms_spam`), each resumable, checked against a sha256, and renamed into the cache
  only when complete;
- writing: `atomic_open` (with hfformat.write_safetensors for weights) and `staged_folder`, so a
  crash leaves the old file or none, never half a file or folder;
- GPT-2's tokenizer from the BPE files shipped in `gpt2_bpe/` (`gpt2_tokenizer`), so tokenizing
  never needs the network;
- the command behind `python gpt.py "Every effort moves"` (`generate_command`), the check that
  downloaded weights work. gpt.py hands itself over to it: hub.py imports no project module.

The cache is `$GPT2_CLASSIFICATION_CACHE`, else `$XDG_CACHE_HOME` or `~/.cache`, then
`gpt2-classification`; a preset already in the Hugging Face cache (`find_in_hf_cache`) is read from
there. `GPT2_HUB_URL` points the weight downloads at a mirror of the hub.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

import tiktoken
import torch
from tiktoken_ext import openai_public
from torch import nn

try:
    import fcntl  # file locks, on every system but Windows
except ImportError:
    fcntl = None

Progress = Callable[[int, "int | None"], None]  # (bytes done, total bytes or None when unknown)

HF_HUB_URL = "https://huggingface.co"
PRESET_REPOS = {"gpt2-small": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
                "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_MEMBER = "SMSSpamCollection"  # the file inside the UCI archive
SMS_SPAM_SIZE = 477_907
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
USER_AGENT = "gpt2-classification/0.1 (urllib)"
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0  # for each request, and each read of a download
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
SLOW_WINDOW_SECONDS, MIN_BYTES_PER_WINDOW = 60, 64 * 1024  # slower than about 1 KB/s for a minute: give up
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def quiet_closed_stdout() -> int:
    """The output went to a pipe that closed (`| head -1`): stop quietly, exit code 1. stdout now
    leads nowhere, else Python's flush at exit complains."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


def printable(text: str, keep: str = "") -> str:
    """`text` with control characters (ANSI escape sequences among them), bidirectional overrides
    and undecodable bytes shown as escapes (\\x1b), so printing untrusted text cannot drive the
    terminal; characters in `keep` (say "\\n") stay as they are."""
    return UNPRINTABLE.sub(lambda m: m.group() if m.group() in keep else m.group().encode("unicode_escape",
                           "backslashreplace").decode("ascii"), text)


def default_cache_dir() -> Path:
    if os.environ.get("GPT2_CLASSIFICATION_CACHE"):
        return Path(os.environ["GPT2_CLASSIFICATION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-classification"


def print_progress(done: int, total: int | None) -> None:
    """A progress callback for the commands: one line on stderr, rewritten in place."""
    of_total = f" of {total / 1e6:.1f} MB ({100 * done / total:3.0f}%)" if total else " MB"
    sys.stderr.write(f"\rdownloading: {done / 1e6:9.1f}{of_total}" + ("\n" if total and done >= total else ""))
    sys.stderr.flush()


def read_small_file(path: Path, limit: int) -> bytes:
    """At most limit + 1 bytes of a regular file (links followed); OSError for anything else: a named
    pipe would block the read forever, /dev/zero never ends. (gpt.read_json does the same for JSON.)"""
    if path.exists() and not path.is_file():
        raise OSError(f"{path} is not a regular file")
    with open(path, "rb") as file:  # a missing one: FileNotFoundError
        return file.read(limit + 1)


# --------------------------------------------------------------------------- writing files whole


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A new binary file that appears at `path` only once completely written: it is written to a
    temporary file in the same folder, flushed to disk, then renamed over `path`, so a crash or
    Ctrl-C leaves either the old file or none, never half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # same folder: rename is atomic
    try:
        with open(temporary, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_folder(out: str | Path, what: str, finished: Callable[[], bool] = lambda: False) -> Iterator[Path]:
    """A hidden folder beside `out` that becomes `out` only when everything in it is written: an error
    or Ctrl-C leaves no half-written folder, nor the parents made for it, unless `finished()` says
    that finished work is in it (a comparison's runs done before the interruption): that is kept,
    as `out`. Creating it first also proves `out` writable before any work starts. `out` must not
    exist, or be an empty folder; `what` names it in errors ("--out"), which are ValueErrors (one
    line). Finished work is never deleted: if `out` cannot take it, it is kept beside it under a
    visible name."""
    out = Path(os.path.realpath(out))  # "." has no name to rename onto; a link: the folder it names
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{what} {out}: already exists and is not empty; choose a new folder")
    missing = [parent for parent in [out.parent, *out.parent.parents] if not parent.exists()]
    staging = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as error:
        raise ValueError(f"{what} {out}: cannot write there ({error.strerror or error})") from None

    def move_into_out() -> None:
        if out.exists():
            out.rmdir()  # empty when the run started: it fails if something was put there since
        staging.rename(out)

    try:
        yield staging
    except BaseException:
        if finished():
            with contextlib.suppress(OSError):  # finished work: kept where it was asked for (else where it is)
                move_into_out()
        else:
            shutil.rmtree(staging, ignore_errors=True)
            for parent in missing:  # nearest first: remove the folders made for this run
                with contextlib.suppress(OSError):
                    parent.rmdir()
        raise
    try:  # the run is complete: from here on it is never deleted
        move_into_out()
    except OSError as error:  # keep the finished run under a visible name, or where it is
        kept = out.parent / f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        with contextlib.suppress(OSError):
            staging.rename(kept)
        raise ValueError(f"{what} {out}: {error.strerror or error} (created by something else meanwhile?); "
                         f"the finished work is in {kept if kept.exists() else staging}") from None


# --------------------------------------------------------------------------- GPT-2's tokenizer, shipped
#
# tiktoken downloads GPT-2's two BPE files on first use. The repository ships them instead (OpenAI's
# files, byte for byte: gpt2_bpe/LICENSE), so a fresh clone tokenizes offline. vocab.bpe lists the
# merges in rank order; encoder.json maps each token to its id. Both write a byte as a printable
# character: the printable bytes as themselves, the others as chr(256 + n), n counting them in order.

GPT2_BPE_DIR = Path(__file__).resolve().parent / "gpt2_bpe"
GPT2_BPE_SHA256 = {  # as tiktoken_ext/openai_public.py pins them
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
END_OF_TEXT = "<|endoftext|>"  # id 50256, the one special token


def gpt2_mergeable_ranks(vocab_bpe: str, encoder_json: str) -> dict[bytes, int]:
    """tiktoken's `mergeable_ranks` from GPT-2's two files, as tiktoken.load builds them: the 256
    single bytes first, then one token per merge; encoder.json must agree token for token."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}

    def decode(word: str) -> bytes:
        return bytes(to_byte[char] for char in word)

    ranks = {bytes([b]): rank for rank, b in enumerate(printable + others)}
    for rank, merge in enumerate(vocab_bpe.split("\n")[1:-1], start=len(ranks)):  # line 0: "#version: 0.2"
        first, second = merge.split()
        ranks[decode(first) + decode(second)] = rank
    ids = {decode(token): rank for token, rank in json.loads(encoder_json).items() if token != END_OF_TEXT}
    if ranks != ids:
        raise ValueError("vocab.bpe and encoder.json disagree: not GPT-2's files")
    return ranks


def read_gpt2_bpe(folder: Path) -> dict[str, str]:
    """The two files' text, each checked against its sha256 (OSError or ValueError, one line)."""
    texts = {}
    for name, sha256 in GPT2_BPE_SHA256.items():
        content = read_small_file(folder / name, 2**21)  # each is about 1 MB: more is damage anyway
        if hashlib.sha256(content).hexdigest() != sha256:
            raise ValueError(f"{folder / name} is damaged (its sha256 is not {sha256[:12]}...)")
        texts[name] = content.decode("utf-8")
    return texts


@functools.cache  # built once per process (a third of a second), like tiktoken.get_encoding's own cache
def gpt2_tokenizer(folder: Path = GPT2_BPE_DIR) -> tiktoken.Encoding:
    """GPT-2's byte-pair encoding, the same tiktoken.Encoding as tiktoken.get_encoding("gpt2"), built
    from the files in `folder`. Where they are missing or damaged, tiktoken's own cache or download;
    ValueError (one line) when that fails too."""
    try:
        texts = read_gpt2_bpe(folder)
    except (OSError, ValueError) as error:
        shipped = " ".join(str(error).split())
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as download_error:  # tiktoken raises whatever its download raised
            reason = " ".join(f"{type(download_error).__name__}: {download_error}".split())
            raise ValueError(f"GPT-2's BPE files: {shipped}; tiktoken could not fetch them either ({reason}); "
                             f"restore {folder}/ from the repository (git checkout -- {folder.name}), or point "
                             "TIKTOKEN_CACHE_DIR at a folder holding tiktoken's copies") from None
    return tiktoken.Encoding("gpt2", pat_str=openai_public.r50k_pat_str, explicit_n_vocab=50257,
                             mergeable_ranks=gpt2_mergeable_ranks(texts["vocab.bpe"], texts["encoder.json"]),
                             special_tokens={END_OF_TEXT: 50256})


# --------------------------------------------------------------------------- downloads


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


@contextlib.contextmanager
def cache_lock(folder: Path) -> Iterator[None]:
    """One process at a time in a cache folder: two runs downloading the same file into one cache
    take turns (the second then finds the first one's verified file). An flock on the folder
    itself, so no lock file is left behind and a crashed process releases it; where the system
    has no flock (Windows), no lock."""
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _fetch(url: str, partial: Path, progress: Progress) -> bool:
    """Append the rest of `url` to `partial` (all of it when the server ignores Range); False when the
    server says (HTTP 416) that `partial` already holds every byte, or more.

    Each read waits at most TIMEOUT_SECONDS, and the download as a whole must keep up
    MIN_BYTES_PER_WINDOW bytes in every SLOW_WINDOW_SECONDS: a server that trickles a byte at a
    time cannot hold it forever.
    """
    done = partial.lstat().st_size if partial.exists() else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={done}-"} if done else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        if error.code == 416 and done:  # "range not satisfiable": nothing left after byte `done`
            return False
        raise
    with response:
        if done and response.status != 206:  # the server ignored Range and sends it all: restart
            done = 0
        elif done and not response.headers.get("Content-Range", "").startswith(f"bytes {done}-"):
            raise ConnectionError(f"asked for bytes {done}- but got {response.headers.get('Content-Range')!r}")
        length = response.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        window_start, window_bytes = time.monotonic(), 0
        if partial.is_symlink():  # it would write wherever the link points
            raise ValueError(f"{partial} is a symbolic link; refusing to write through it (delete it and run again)")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if done else os.O_TRUNC) | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(partial, flags, 0o644), "wb") as file:
            progress(done, total)
            while chunk := response.read1(CHUNK_BYTES):  # read1: whatever has arrived, not a full chunk
                file.write(chunk)
                done, window_bytes = done + len(chunk), window_bytes + len(chunk)
                progress(done, total)
                if time.monotonic() - window_start >= SLOW_WINDOW_SECONDS:
                    if window_bytes < MIN_BYTES_PER_WINDOW:
                        raise ConnectionError(f"too slow: {window_bytes} bytes in {SLOW_WINDOW_SECONDS} s")
                    window_start, window_bytes = time.monotonic(), 0
    if total is not None and done < total:
        raise ConnectionError(f"the connection closed after {done} of {total} bytes")
    return True


def download(url: str, dest: str | Path, sha256: str | None = None, progress: Progress | None = None) -> Path:
    """Download `url` to `dest`, resumably and atomically; returns `dest`.

    Returns at once, with no request, when `dest` exists. Bytes go to `<dest>.part` first (never
    through a symbolic link); an interrupted download resumes from there on the next call. With
    `sha256`, the bytes on disk are checked before `dest` appears: a mismatch deletes the partial
    file and raises ValueError. Processes downloading into one folder take turns (`cache_lock`).
    Network failures raise ConnectionError naming the URL and the reason.
    """
    dest = Path(dest)
    with cache_lock(dest.parent):
        return _download_locked(url, dest, sha256, progress)


def _download_locked(url: str, dest: Path, sha256: str | None, progress: Progress | None) -> Path:
    if dest.is_file():
        return dest
    partial, progress = dest.with_name(dest.name + ".part"), progress or (lambda done, total: None)
    try:
        if not _fetch(url, partial, progress) and sha256 is None:
            partial.unlink()  # complete or too long, and nothing to check it against: fetch it afresh
            _fetch(url, partial, progress)
    except urllib.error.HTTPError as error:
        raise ConnectionError(f"could not download {url}: HTTP {error.code} {error.reason}") from None
    except NETWORK_ERRORS as error:
        kept = (f"; the {partial.stat().st_size} bytes so far stay in {partial} for the next try"
                if partial.exists() else "")
        raise ConnectionError(f"could not download {url}: {getattr(error, 'reason', None) or error!r}{kept}") from None
    if sha256 is not None and (digest := file_sha256(partial)) != sha256.lower():  # the bytes on disk
        partial.unlink()
        raise ValueError(f"{url}: the download's sha256 is {digest}, expected {sha256.lower()}; "
                         "the corrupt file was deleted, run again to download it afresh")
    os.replace(partial, dest)
    return dest


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs) -> None:
        return None  # hand back the 3xx answer itself: its headers are what we came for


def hub_sha256(url: str) -> str:
    """The sha256 the Hugging Face hub publishes for a file stored with Git LFS.

    The hub answers a HEAD request for a resolve URL with a redirect to its CDN that carries
    `X-Linked-Etag: "<sha256>"`; the redirect is not followed, except when it stays on the hub
    (a renamed repository).
    """
    opener = urllib.request.build_opener(_NoRedirect)
    for _ in range(5):
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
        try:
            with opener.open(request, timeout=TIMEOUT_SECONDS) as response:
                status, headers = response.status, response.headers
        except urllib.error.HTTPError as error:  # a 3xx lands here with _NoRedirect
            if not 300 <= error.code < 400:
                raise ConnectionError(f"could not reach {url}: HTTP {error.code} {error.reason}") from None
            status, headers = error.code, error.headers
        except NETWORK_ERRORS as error:
            raise ConnectionError(f"could not reach {url}: {getattr(error, 'reason', None) or error!r}") from None
        etag = headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            return etag
        location = headers.get("Location", "")
        if not (300 <= status < 400 and location.startswith("/")):
            break
        url = urllib.parse.urljoin(url, location)  # a redirect within the hub: ask there
    raise ValueError(f"{url}: the hub published no sha256 (X-Linked-Etag header) for this file, "
                     "so it cannot be verified; refusing to download it")


def hf_hub_cache() -> Path:
    """Where huggingface_hub (and so transformers) keeps its downloads, by its own rule: $HF_HUB_CACHE,
    else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")  # the second: its old name
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def find_in_hf_cache(name: str, hf_cache: str | Path | None = None) -> Path | None:
    """A preset's model.safetensors that transformers or huggingface_hub already downloaded, or None.

    Their cache keeps a repository in models--{owner}--{name}/snapshots/{commit}/, and refs/main names
    the commit last downloaded; GPT-2's repositories also answer to their old names (models--gpt2).
    The file is not hashed (huggingface_hub checked its size when it downloaded it, as our own cache
    is trusted once verified); loading checks every tensor's name and shape against the preset.
    """
    cache, repo = Path(hf_cache or hf_hub_cache()), PRESET_REPOS[name]
    for folder in (cache / f"models--{repo.replace('/', '--')}", cache / f"models--{repo.split('/')[1]}"):
        main = ""
        with contextlib.suppress(OSError, ValueError):
            main = read_small_file(folder / "refs" / "main", 100).decode("utf-8").strip()
        named = folder / "snapshots" / main / "model.safetensors"
        if re.fullmatch(r"[0-9a-f]{40}", main) and named.is_file():  # refs/main: a commit hash, never a path
            return named
        newest_first = sorted((path for path in (folder / "snapshots").glob("*/model.safetensors") if path.is_file()),
                              key=lambda path: path.stat().st_mtime, reverse=True)  # is_file: no dangling link
        if newest_first:
            return newest_first[0]
    return None


def fetch(source: str | Path, cache_dir: str | Path | None = None, progress: Progress | None = None) -> str | Path:
    """What gpt.load_gpt2 reads for `source`: a preset name becomes its weights file (in our cache,
    `<cache>/<preset>/model.safetensors`, else in the Hugging Face cache, else downloaded into ours
    and verified, once); a local folder or file is returned as it is."""
    if not (isinstance(source, str) and source in PRESET_REPOS):
        return source
    ours = Path(cache_dir if cache_dir is not None else default_cache_dir()) / source / "model.safetensors"
    if ours.is_file():
        return ours
    if (theirs := find_in_hf_cache(source)) is not None:
        return theirs
    hub = os.environ.get("GPT2_HUB_URL") or HF_HUB_URL
    url = f"{hub.rstrip('/')}/{PRESET_REPOS[source]}/resolve/main/model.safetensors"
    return download(url, ours, sha256=hub_sha256(url), progress=progress)


def download_sms_spam(cache_dir: str | Path | None = None, progress: Progress | None = None,
                      url: str | None = None) -> Path:
    """The SMS Spam Collection file, downloaded from UCI once and cached.

    Downloads the archive, extracts `SMSSpamCollection` (reading no more than its known size),
    checks its size and sha256, and writes it atomically to `<cache_dir>/sms_spam/SMSSpamCollection`.
    A cached copy is checked the same way on every call (half a megabyte) and fetched again when
    damaged. `url` (default SMS_SPAM_URL) may point at a mirror. ConnectionError when the download
    fails; ValueError (and nothing cached) when the archive does not hold the expected file.
    """
    url = url or SMS_SPAM_URL
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "sms_spam" / SMS_SPAM_MEMBER
    with cache_lock(target.parent):
        if target.is_file() and target.stat().st_size == SMS_SPAM_SIZE and _is_sms_spam(target.read_bytes()):
            return target
        archive = target.parent / "sms+spam+collection.zip"
        try:
            _download_locked(url, archive, None, progress)
            content = _sms_spam_member(archive, url)
        finally:
            archive.unlink(missing_ok=True)  # only the extracted, verified file is kept
        if not _is_sms_spam(content):
            raise ValueError(f"{url}: {SMS_SPAM_MEMBER} has {len(content)} bytes and sha256 "
                             f"{hashlib.sha256(content).hexdigest()}, expected {SMS_SPAM_SIZE} bytes and sha256 "
                             f"{SMS_SPAM_SHA256}; pass the path of a good copy instead")
        with atomic_open(target) as file:
            file.write(content)
    return target


def _is_sms_spam(content: bytes) -> bool:
    return len(content) == SMS_SPAM_SIZE and hashlib.sha256(content).hexdigest() == SMS_SPAM_SHA256


def _sms_spam_member(archive: Path, url: str) -> bytes:
    """The bytes of the archive's SMSSpamCollection, at most SMS_SPAM_SIZE + 1 of them: an archive
    that inflates to gigabytes costs no more memory than the right file."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            names = [name for name in zipped.namelist() if Path(name).name == SMS_SPAM_MEMBER]
            if not names:
                raise ValueError(f"{url}: the archive has no {SMS_SPAM_MEMBER} (it holds {zipped.namelist()[:5]})")
            with zipped.open(names[0]) as file:
                return file.read(SMS_SPAM_SIZE + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as error:
        raise ValueError(f"{url}: not a valid zip archive ({error})") from error


# --------------------------------------------------------------------------- the gpt.py command


@torch.no_grad()
def generate(model: nn.Module, token_ids: torch.Tensor, max_new_tokens: int, top_k: int | None = None,
             temperature: float = 1.0, generator: torch.Generator | None = None,
             vocab_limit: int | None = None) -> torch.Tensor:
    """Extend token_ids (B, T) by max_new_tokens tokens: (B, T + max_new_tokens).

    Greedy (the most likely next token) when top_k is None or temperature is 0; otherwise samples
    among the top_k most likely tokens, their logits divided by temperature. With `vocab_limit`,
    only tokens below it are chosen (a model whose vocabulary is larger than the tokenizer's).
    Call model.eval() first if the model has dropout.
    """
    check_generation(max_new_tokens, top_k, temperature)
    for _ in range(max_new_tokens):
        context = token_ids[:, -model.cfg.context_length :]  # (B, <= context_length)
        logits = model(context)[:, -1, :vocab_limit]  # (B, V): only the last position predicts the next token
        if not torch.isfinite(logits).all():
            raise ValueError("the model's logits are not finite: its weights hold NaN or infinity")
        if top_k is None or temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            top_logits, top_ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # (B, k)
            # Shifted so the best logit is 0: even a temperature of 1e-320 gives 0 / t, not inf / inf.
            probabilities = torch.softmax((top_logits - top_logits[:, :1]) / temperature, dim=-1)  # (B, k)
            next_token = top_ids.gather(-1, torch.multinomial(probabilities, 1, generator=generator))  # (B, 1)
        token_ids = torch.cat([token_ids, next_token], dim=1)  # (B, T + 1)
    return token_ids


def check_generation(max_new_tokens: int, top_k: int | None, temperature: float) -> None:
    if not (max_new_tokens >= 0 and (top_k is None or top_k >= 1) and 0 <= temperature < math.inf):
        raise ValueError(f"need max_new_tokens >= 0, top_k >= 1 and a finite temperature >= 0; "
                         f"got {max_new_tokens}, {top_k} and temperature {temperature}")


def generate_command(gpt: ModuleType, argv: list[str] | None = None) -> int:
    """`python gpt.py "Every effort moves"`: load GPT-2 and print a continuation; returns the exit
    code (2 with one line on stderr for any error). `gpt` is gpt.py, which its `__main__` block
    passes in: hub.py imports no project module, and gpt.py copied alone needs torch only."""
    parser = argparse.ArgumentParser(
        prog="gpt.py",
        description="Continue a text with pretrained GPT-2 (a check that the weights loaded right).",
        epilog="With the real gpt2-small weights, greedy decoding of 'Every effort moves' "
        "starts 'Every effort moves forward, but it's not enough.'",
    )
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--model", default="gpt2-small", help=f"preset ({', '.join(gpt.PRESETS)}), Hugging Face "
                        "directory or .safetensors file (default: gpt2-small)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens to add (default: 20)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --top-k (default: 1.0)")
    parser.add_argument("--seed", type=int, default=123, help="random seed for sampling (default: 123)")
    parser.add_argument("--cache-dir", type=Path, help=f"download folder (default: {default_cache_dir()})")
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a character the terminal cannot show: an escape, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        check_generation(args.max_new_tokens, args.top_k, args.temperature)
        cfg = gpt.load_config(args.model)  # a bad --model fails here, before any download
        tokenizer = gpt2_tokenizer()
        prompt_ids = tokenizer.encode(args.prompt, allowed_special={END_OF_TEXT})
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if cfg.vocab_size < tokenizer.n_vocab:
            raise ValueError(f"--model {args.model} has {cfg.vocab_size} tokens, fewer than GPT-2's tokenizer")
        weights = fetch(args.model, args.cache_dir, print_progress)
        print(f"weights: {printable(str(weights))}", file=sys.stderr)
        output = generate(gpt.load_gpt2(weights, config=cfg), torch.tensor([prompt_ids]), args.max_new_tokens,
                              top_k=args.top_k, temperature=args.temperature,
                              generator=torch.Generator().manual_seed(args.seed), vocab_limit=tokenizer.n_vocab)
        print(printable(tokenizer.decode(output[0].tolist()), keep="\n"), flush=True)
    except BrokenPipeError:  # `python gpt.py ... | head -1` closed the pipe
        return quiet_closed_stdout()
    except (ValueError, OSError) as error:  # OSError covers ConnectionError and unwritable caches
        print(f"error: {printable(' '.join(str(error).split()))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
