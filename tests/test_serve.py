"""`python classify.py --serve` (serve.py): its answers are exactly `classify.predict`'s; every bad
request gets a 4xx with a one-line JSON error and the server lives on; a stalled or trickling
client is dropped without holding up the others; concurrent requests are all answered; SIGTERM and
Ctrl-C stop the command with its port freed; the page works in a real browser (headless Chromium).

Every server here listens on a free port of 127.0.0.1, with a tiny model (random weights, GPT-2's
vocabulary, so `predict` accepts it)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import browser
import classify
import gpt
import report
import serve

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["WINNER!! Claim your free prize now", "Lunch at 1?", "", '<b>bold</b> & "quoted"', "ção é 🎉 " * 20]
HTML_EXAMPLE = '<img src=x onerror="window.injected = 1"> <b>WIN</b> a prize'
JSON = {"Content-Type": "application/json"}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A saved run: a 2-block classifier, and a metrics.json whose base model is written in HTML."""
    torch.manual_seed(0)
    shape = gpt.GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_layers=2, n_heads=2)
    run_dir = tmp_path_factory.mktemp("run")
    classify.save_classifier(classify.GPTClassifier(gpt.GPTModel(shape), 2), run_dir, ["ham", "spam"], max_length=24)
    metrics = {"strategy": "last-block", "model": {"source": "<b>gpt2-small</b>", "init": "random"}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return run_dir


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return classify.load_classifier(tiny_run)


def predicted(loaded, texts: list[str]) -> list[dict]:
    """What POST /classify must answer: classify.predict's labels and probabilities."""
    model, config = loaded
    return [{"label": p.label, "probabilities": p.probabilities} for p in classify.predict(model, config, texts)]


@contextlib.contextmanager
def running(loaded, facts: serve.ModelFacts, classify_texts=None, **limits):
    """A server on a free port of 127.0.0.1, serving from a thread, as report.classify_command wires it."""
    model, config = loaded
    classify_texts = classify_texts or (lambda texts: [asdict(p) for p in classify.predict(model, config, texts)])
    server = serve.make_server(classify_texts, facts, "127.0.0.1", 0, **limits)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()  # serve_forever returns
        assert server.stop(wait_seconds=30), "a connection's thread outlived the server"
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(loaded, tiny_run):
    facts = replace(serve.model_facts(tiny_run, ["ham", "spam"], 24), examples=[HTML_EXAMPLE, "Lunch at 1?"])
    with running(loaded, facts, idle_seconds=2.0, read_seconds=3.0) as server:
        yield server


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one request on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def classify_over_http(port: int, texts: list) -> list[dict]:
    status, _, body = request(port, "POST", "/classify", json.dumps({"texts": texts}).encode(), JSON)
    assert status == 200, body
    return json.loads(body)["predictions"]


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(data)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


def assert_one_line_json_error(status: int, headers: dict, body: bytes, want: int) -> str:
    assert status == want, body
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert body.endswith(b"\n") and body.count(b"\n") == 1
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error
    return error


def assert_alive(port: int) -> None:
    assert request(port, "GET", "/health")[::2] == (200, b'{"status": "ok"}\n')


# --------------------------------------------------------------------------- the endpoints


def test_health_info_and_the_page(server):
    assert_alive(server.port)
    status, headers, body = request(server.port, "GET", "/info")
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(body) == {"classes": ["ham", "spam"], "model": "<b>gpt2-small</b> (random init)",
                                "strategy": "last-block", "max_length": 24, "examples": [HTML_EXAMPLE, "Lunch at 1?"],
                                "limits": {"max_body_bytes": 2**20, "max_texts": 1000}}
    status, headers, page = request(server.port, "GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'sha256-" in headers["Content-Security-Policy"] and "frame-ancestors 'none'" in \
        headers["Content-Security-Policy"]
    assert b"innerHTML" not in page and b"textContent" in page  # data is set as text, never parsed as HTML
    assert not re.search(rb"https?://|src=|href=", page)  # no external assets


def test_predictions_are_exactly_predict_s_and_the_json_command_s(server, loaded, tiny_run, capsys):
    answer = classify_over_http(server.port, TEXTS)
    assert answer == predicted(loaded, TEXTS)  # exact floats: JSON carries every digit
    assert report.classify_command(classify, ["--model", str(tiny_run), "--json", *TEXTS]) == 0
    command = json.loads(capsys.readouterr().out)
    assert [{"label": item["label"], "probabilities": item["probabilities"]} for item in command] == answer
    assert classify_over_http(server.port, []) == []


def test_a_lone_surrogate_and_a_1_mib_body_are_classified(server, loaded):
    texts = ["\ud800 half a character"]
    assert classify_over_http(server.port, texts) == predicted(loaded, texts)
    padding = 2**20 - len(json.dumps({"texts": [""]}))
    body = json.dumps({"texts": ["a" * padding]}).encode()
    assert len(body) == 2**20
    status, _, answer = request(server.port, "POST", "/classify", body, JSON)
    assert status == 200 and json.loads(answer)["predictions"] == predicted(loaded, ["a" * padding])


def test_one_thousand_texts_are_one_request(server, loaded):
    texts = [f"message number {i}" for i in range(1000)]
    assert classify_over_http(server.port, texts) == predicted(loaded, texts)


# --------------------------------------------------------------------------- refusals, each a one-line 4xx

REFUSALS = {  # name: (method, path, body, headers, status, words in the error)
    "1,001 texts": ("POST", "/classify", json.dumps({"texts": ["hi"] * 1001}).encode(), JSON, 413, "1,001 texts"),
    "not JSON": ("POST", "/classify", b'{"texts": ["unfinished', JSON, 400, "not JSON"),
    "not UTF-8": ("POST", "/classify", b'{"texts": ["\xff"]}', JSON, 400, "not JSON"),
    "nested too deep": ("POST", "/classify", b"[" * 100_000, JSON, 400, "not JSON"),
    "an array": ("POST", "/classify", b'["a", "b"]', JSON, 400, '{"texts"'),
    "texts not a list": ("POST", "/classify", b'{"texts": "a"}', JSON, 400, '{"texts"'),
    "another field": ("POST", "/classify", b'{"texts": [], "model": "x"}', JSON, 400, "unknown field 'model'"),
    "a number as text": ("POST", "/classify", b'{"texts": ["a", 3]}', JSON, 400, "texts[1] is a number"),
    "null as text": ("POST", "/classify", b'{"texts": [null]}', JSON, 400, "texts[0] is null"),
    "a form": ("POST", "/classify", b"texts=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
               "application/json"),
    "GET /classify": ("GET", "/classify", None, {}, 405, "use POST /classify"),
    "PUT /classify": ("PUT", "/classify", b"{}", JSON, 405, "use POST /classify"),
    "POST /health": ("POST", "/health", b"{}", JSON, 405, "use GET /health"),
    "DELETE /": ("DELETE", "/", None, {}, 405, "use GET /"),
    "HEAD /info": ("HEAD", "/info", None, {}, 405, None),  # a HEAD answer has no body
    "no such page": ("GET", "/admin", None, {}, 404, "no page '/admin'"),
    "another host": ("GET", "/info", None, {"Host": "attacker.example:8000"}, 403, "localhost only"),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_bad_request_is_a_4xx_with_one_line_of_json(server, case):
    method, path, body, headers, want, words = case
    status, answer_headers, answer = request(server.port, method, path, body, headers)
    if words is None:
        assert status == want and answer == b""
    else:
        assert words in assert_one_line_json_error(status, answer_headers, answer, want)
    assert_alive(server.port)


RAW_REFUSALS = {  # name: (bytes sent, status, words in the error); the bodies over the limit are never sent
    "no Content-Length": (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\r\n",
                          411, "Content-Length"),
    "chunked": (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411, "not chunked"),
    "a body over 1 MiB": (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1048577\r\n\r\n", 413, "1,048,577 bytes"),
    "two lengths": (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\nContent-Length: 9\r\n\r\n{}", 400, "not one number"),
    "a negative length": (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: -1\r\n\r\n", 400, "not one number"),
    "an unknown method": (b"BREW /classify HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "use POST /classify"),
    "HTTP/2.0": (b"GET /health HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", 400, "version"),
    "not a request line": (b"HELLO\r\n\r\n", 400, "Bad request syntax"),
}


@pytest.mark.parametrize("case", RAW_REFUSALS.values(), ids=RAW_REFUSALS.keys())
def test_a_malformed_request_is_a_4xx_with_one_line_of_json(server, case):
    data, want, words = case
    head, _, body = raw_exchange(server.port, data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert words in assert_one_line_json_error(int(status_line.split()[1]), headers, body, want)
    assert headers["Connection"] == "close"
    assert_alive(server.port)


def acceptable_texts(body: bytes) -> list[str] | None:
    """The texts of a body POST /classify must classify; None for one it must refuse."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(document, dict) and document.keys() == {"texts"} and isinstance(document["texts"], list)):
        return None
    texts = document["texts"]
    return texts if len(texts) <= 1000 and all(isinstance(text, str) for text in texts) else None


BODIES = (JSON_VALUES.map(lambda value: json.dumps(value).encode())
          | st.lists(st.text(max_size=30) | JSON_VALUES, max_size=6).map(lambda t: json.dumps({"texts": t}).encode())
          | st.binary(max_size=40))


@settings(max_examples=120, deadline=None)
@given(body=BODIES)
def test_any_body_is_classified_or_refused_with_a_4xx_never_a_5xx(server, loaded, body):
    status, headers, answer = request(server.port, "POST", "/classify", body, JSON)
    texts = acceptable_texts(body)
    if texts is None:
        assert 400 <= status < 500
        assert_one_line_json_error(status, headers, answer, status)
    else:
        assert status == 200 and json.loads(answer)["predictions"] == predicted(loaded, texts)


def test_a_model_failure_is_one_line_500_and_the_server_goes_on(loaded):
    def failing(texts):
        raise RuntimeError("out of memory\nwhile classifying")

    with running(loaded, serve.ModelFacts(["ham", "spam"]), classify_texts=failing) as server:
        status, headers, body = request(server.port, "POST", "/classify", b'{"texts": ["x"]}', JSON)
        assert "out of memory while classifying" in assert_one_line_json_error(status, headers, body, 500)
        assert_alive(server.port)


# --------------------------------------------------------------------------- slow clients, many clients


def closed_by_server(connection: socket.socket, keep_sending: bytes = b"", guard_seconds: float = 30) -> bytes:
    """Wait (sending `keep_sending` every 0.3 s, a trickle) until the server closes the connection;
    what it sent before closing. Fails when the guard time passes first."""
    received, deadline = b"", time.monotonic() + guard_seconds
    while time.monotonic() < deadline:
        readable, _, _ = select.select([connection], [], [], 0.3)
        if readable:
            try:
                chunk = connection.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk
        elif keep_sending:
            try:
                connection.sendall(keep_sending)
            except (BrokenPipeError, ConnectionResetError):
                return received
    pytest.fail(f"the server kept a stalled connection open for {guard_seconds} s")


def test_stalled_and_trickling_clients_are_dropped_without_holding_up_the_others(server, loaded):
    head = (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as half_body, \
            socket.create_connection(("127.0.0.1", server.port)) as half_line, \
            socket.create_connection(("127.0.0.1", server.port)) as trickle:
        half_body.sendall(head + b'{"texts": ["ha')  # then silence
        half_line.sendall(b"GET /hea")  # then silence
        trickle.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")  # then a byte every 0.3 s: never idle, never done
        assert classify_over_http(server.port, TEXTS) == predicted(loaded, TEXTS)  # while they hang on
        assert_alive(server.port)
        assert closed_by_server(trickle, keep_sending=b"a") == b""  # never idle: the request's deadline drops it
        assert closed_by_server(half_body).startswith(b"HTTP/1.1 408 ")  # silent: dropped meanwhile
        assert closed_by_server(half_line) == b""
    assert_alive(server.port)


def test_concurrent_requests_are_all_answered_correctly(server, loaded):
    batches = [[f"client {i} message {j}" * (1 + j % 3) for j in range(i % 5 + 1)] for i in range(24)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda texts: classify_over_http(server.port, texts), batches))
    assert answers == [predicted(loaded, texts) for texts in batches]
    assert_alive(server.port)


def test_connections_beyond_the_cap_are_refused_at_once_with_503(loaded):
    with running(loaded, serve.ModelFacts(["ham", "spam"]), max_connections=2) as server:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        try:
            time.sleep(0.2)  # let the server accept them
            head, _, body = raw_exchange(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").partition(
                b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and "too many connections" in json.loads(body)["error"]
        finally:
            for connection in held:
                connection.close()
        deadline = time.monotonic() + 10
        while request(server.port, "GET", "/health")[0] != 200:  # the slots come back once they close
            assert time.monotonic() < deadline, "the connection slots never came back"
            time.sleep(0.05)


def test_stop_lets_the_batch_finish_and_ends_every_connection(loaded):
    """Nothing is left running when the process exits (a thread inside torch then can abort it)."""
    computing, release = threading.Event(), threading.Event()

    def slow(texts):
        computing.set()
        release.wait(30)
        return [{"label": "ham", "probabilities": {"ham": 1.0, "spam": 0.0}} for _ in texts]

    with running(loaded, serve.ModelFacts(["ham", "spam"]), classify_texts=slow, idle_seconds=120) as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=30) as idle, \
            ThreadPoolExecutor(max_workers=2) as pool:
        answered = pool.submit(request, server.port, "POST", "/classify", b'{"texts": ["a"]}', JSON)
        assert computing.wait(30)
        server.shutdown()
        stopped = pool.submit(server.stop, 20)  # while the batch is being computed
        assert server.stopping.wait(30)  # set once the listening socket is closed
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=10).close()  # no longer listening
        release.set()
        assert stopped.result(timeout=60) is True  # every connection's thread ended
        status, _, body = answered.result(timeout=60)
        assert status == 200 and json.loads(body)["predictions"][0]["label"] == "ham"  # the batch finished
        assert idle.recv(1) == b""  # the idle keep-alive connection was ended by the server


# --------------------------------------------------------------------------- the command: start, stop, refuse


def start_command(run_dir: Path, *argv: str) -> tuple[subprocess.Popen, int]:
    """`python classify.py --model RUN --serve --port 0 ...` and the port it printed."""
    quiet = {**os.environ, "PYTHONWARNINGS": "ignore:Failed to initialize NumPy"}
    process = subprocess.Popen([sys.executable, str(REPO / "classify.py"), "--model", str(run_dir), "--serve",
                                "--port", "0", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=quiet)
    readable, _, _ = select.select([process.stdout], [], [], 120)
    line = process.stdout.readline() if readable else ""
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        process.kill()
        pytest.fail(f"no address printed: {line!r} {process.communicate()}")
    return process, int(match.group(1))


@pytest.mark.parametrize(("stop", "exit_code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_the_command_serves_predict_and_stops_cleanly_freeing_its_port(tiny_run, loaded, stop, exit_code):
    process, port = start_command(tiny_run)
    try:
        assert classify_over_http(port, TEXTS) == predicted(loaded, TEXTS)
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == exit_code and err == ""
    assert out.strip().splitlines() == ["stopped"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    with socket.socket() as again:  # the port can be listened on at once
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def test_a_port_in_use_is_one_line_and_exit_code_2(tiny_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert report.classify_command(classify, ["--model", str(tiny_run), "--serve", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"classify.py: error: port {port} is in use; choose another with --port\n"
    assert report.classify_command(classify, ["--model", str(tiny_run), "--serve", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "classify.py: error: port 70000: must be in 0..65535\n"


def test_run_warns_beyond_localhost_prints_the_address_and_stops_on_sigterm(monkeypatch):
    """serve.run in this process, asked for 0.0.0.0 but kept on 127.0.0.1 for the test. SIGTERM
    lands where it once got lost: while the server starts a connection's thread (socketserver
    turns any Exception raised there into a logged error and serves on)."""
    make_server, process_request = serve.make_server, serve.Server.process_request
    monkeypatch.setattr(serve, "make_server", lambda *args, log: make_server(*args[:2], "127.0.0.1", 0, log=log))
    accepted: list = []

    def sigterm_on_the_second_connection(server, connection, address) -> None:
        accepted.append(address)
        if len(accepted) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        process_request(server, connection, address)

    monkeypatch.setattr(serve.Server, "process_request", sigterm_on_the_second_connection)
    lines: list[str] = []

    def client() -> None:  # once the address is printed: a health check, then a second connection
        deadline = time.monotonic() + 30
        while len(lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        port = int(re.search(r":(\d+)/", lines[-1]).group(1))
        lines.append(f"health {request(port, 'GET', '/health')[0]}")
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            deadline = time.monotonic() + 10
            while "stopped" not in lines and time.monotonic() < deadline:
                time.sleep(0.02)
        if "stopped" not in lines:  # SIGTERM was lost: Ctrl-C ends the test (run returns 130) instead of a hang
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=client, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    assert serve.run(lambda texts: [], serve.ModelFacts(["ham", "spam"]), "0.0.0.0", 8000, log=lines.append) == 0
    port = re.search(r":(\d+)/", lines[1]).group(1)
    assert lines == [f"warning: listening on 0.0.0.0: anyone who can reach port {port} can use this model",
                     f"serving at http://127.0.0.1:{port}/ : open it in a browser, or POST /classify; Ctrl-C stops",
                     "health 200", "stopped"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler it installed is gone


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("127.8.9.10", True), ("0.0.0.0", False), ("::", False),
                                                ("192.168.1.20", False), ("attacker.example", False)])
def test_only_this_machine_s_addresses_count_as_local(host, loopback):
    assert serve.is_loopback(host) is loopback  # run() warns for any other, and skips the Host check


@pytest.mark.parametrize("header", ["localhost:8000", "127.0.0.1", "[::1]:8000", "localhost"])
def test_a_host_header_names_its_host(header):
    assert serve.is_loopback(serve.host_name(header))


@pytest.mark.parametrize("content", [None, b"{}", b"not json", b"[" * 100_000, b'{"strategy": 3, "model": []}',
                                     b'{"strategy": "x", "padding": "' + b"a" * 2000 + b'"}'],
                         ids=["absent", "empty", "not JSON", "nested too deep", "wrong types", "too large"])
def test_unknown_facts_are_unknown(tmp_path, monkeypatch, content):
    monkeypatch.setattr(serve, "MAX_METRICS_BYTES", 1000)
    if content is not None:
        (tmp_path / "metrics.json").write_bytes(content)
    facts = serve.model_facts(tmp_path, ["a", "b"], 7)
    assert (facts.classes, facts.model, facts.strategy, facts.max_length) == (["a", "b"], "unknown", "unknown", 7)


# --------------------------------------------------------------------------- the page in a real browser

READ_RESULT = """(() => {
  const result = document.querySelector("#result");
  if (result.hidden || result.dataset.text !== %s) return null;
  return {label: document.querySelector("#label").textContent,
          rows: [...document.querySelectorAll("#bars .row")].map(row => [row.querySelector(".name").textContent,
                 row.dataset.probability, row.querySelector(".value").textContent])};
})()"""


def assert_shows(shown: dict, want: dict) -> None:
    assert shown["label"] == want["label"]
    assert {name: float(exact) for name, exact, _ in shown["rows"]} == want["probabilities"]  # every digit
    for name, _, percent in shown["rows"]:
        assert float(percent.removesuffix(" %")) == pytest.approx(100 * want["probabilities"][name], abs=0.051)


def test_the_page_in_headless_chromium_types_clicks_and_shows_predict_s_numbers(server, loaded, tmp_path):
    executable = browser.find_chromium()
    if executable is None:
        pytest.skip("no Chromium: apt-get install chromium")
    typed = 'Free entry!! <b>WIN</b> a "prize" & reply'
    with browser.Browser(executable, tmp_path) as chromium:
        page = chromium.open(f"http://127.0.0.1:{server.port}/")
        chromium.wait_for(page, "document.querySelector('#classify')?.disabled === false")  # /info has arrived
        facts = chromium.evaluate(page, "[...document.querySelectorAll('#facts dd')].map(dd => dd.textContent)")
        assert facts == ["ham, spam", "<b>gpt2-small</b> (random init)", "last-block", "24 tokens"]

        chromium.type_into(page, "#text", typed)
        chromium.click(page, "#classify")
        assert_shows(chromium.wait_for(page, READ_RESULT % json.dumps(typed)), predicted(loaded, [typed])[0])

        chromium.click(page, ".example")  # the first example fills the box and is classified
        shown = chromium.wait_for(page, READ_RESULT % json.dumps(HTML_EXAMPLE))
        assert_shows(shown, predicted(loaded, [HTML_EXAMPLE])[0])
        assert chromium.evaluate(page, "document.querySelector('#text').value") == HTML_EXAMPLE
        markup = "[document.querySelectorAll('body img, body b').length, typeof window.injected]"
        assert chromium.evaluate(page, markup) == [0, "undefined"]  # HTML in data stayed text
