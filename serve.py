"""Serving a fine-tuned classifier over HTTP: a page to try it, and a JSON endpoint for programs.

Machinery beside the chapter's "Inferência e uso prático do modelo": `python classify.py --model RUN
--serve` loads the model once, then answers until Ctrl-C or SIGTERM:

    GET  /          a page: type a message, see the predicted class and a bar per class probability
    POST /classify  {"texts": ["...", ...]} -> {"predictions": [{"label": ..., "probabilities": {...}}, ...]}
    GET  /health    {"status": "ok"}
    GET  /info      the model's facts: classes, base model, strategy, max_length, examples, limits

It uses the standard library's HTTP server and knows nothing of the model: the caller hands it
`classify_texts(texts) -> [{"label": str, "probabilities": {name: float}}, ...]` (classify.predict,
in report.py) and the `ModelFacts` to show. Bounded by default: it listens on this machine only; a
bad or oversized request gets a 4xx and a one-line JSON error; a slow or silent client is dropped;
at most MAX_CONNECTIONS are served at once; the model runs one batch at a time (a lock), so every
answer is exactly `classify.predict`'s for that request's texts. docs/serving.md has the
endpoints, the limits and the measured speed.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import http.server
import io
import ipaddress
import json
import math
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hub

MAX_BODY_BYTES = 2**20  # 1 MiB per request body
MAX_TEXTS = 1000  # per request
MAX_CONNECTIONS = 32  # served at once; each holds at most its body and its parse; more get a 503 at once
IDLE_SECONDS = 10.0  # the longest a connection may stay silent, between requests or inside one
READ_SECONDS = 30.0  # the longest a request (line, headers and body) may take to arrive
STOP_WAIT_SECONDS = 10.0  # on Ctrl-C or SIGTERM, how long the batch being computed may take to finish
MAX_METRICS_BYTES = 8 * 2**20  # metrics.json is read for two facts; a larger one is not read
MAX_FACT_CHARS = 200

ClassifyTexts = Callable[[list[str]], list[dict]]
Log = Callable[[str], None]

EXAMPLES = (  # the chapter's data set is SMS messages, in English
    "WINNER!! You have been selected to receive a £900 prize reward. Call 09061701461 to claim now.",
    "Are we still on for lunch at 1? I can bring the notes.",
    "URGENT! Your mobile number has been awarded £2000. Text CLAIM to 81010 before it expires.",
    "Sorry, I'll call you later, I'm in a meeting.",
)


@dataclass(frozen=True)
class ModelFacts:
    """What the page and GET /info tell about the model being served."""

    classes: list[str]
    model: str = "unknown"  # the base model: a preset name or a folder (metrics.json's model.source)
    strategy: str = "unknown"  # the fine-tuning strategy (metrics.json's strategy)
    max_length: int = 0  # tokens read per text; longer texts keep their first max_length
    examples: list[str] = field(default_factory=lambda: list(EXAMPLES))


def model_facts(run_dir: str | Path, classes: list[str], max_length: int) -> ModelFacts:
    """The facts of a run folder: classes and max_length from its config (the caller has them),
    strategy and base model from the metrics.json train.py writes beside it, when it is there,
    readable and at most MAX_METRICS_BYTES; otherwise "unknown"."""
    try:
        with open(Path(run_dir) / "metrics.json", "rb") as file:
            raw = file.read(MAX_METRICS_BYTES + 1)
        document = json.loads(raw) if len(raw) <= MAX_METRICS_BYTES else {}
    except (OSError, ValueError, RecursionError):  # absent, unreadable, not JSON, nested too deep
        document = {}
    document = document if isinstance(document, dict) else {}
    model = document.get("model") if isinstance(document.get("model"), dict) else {}
    source, strategy, known = model.get("source"), document.get("strategy"), {}
    if isinstance(source, str) and source:
        known["model"] = source[:MAX_FACT_CHARS] + (" (random init)" if model.get("init") == "random" else "")
    if isinstance(strategy, str) and strategy:
        known["strategy"] = strategy[:MAX_FACT_CHARS]
    return ModelFacts(list(classes), max_length=max_length, **known)


# --------------------------------------------------------------------------- reading a request


class RequestError(Exception):
    """A request refused with a 4xx: its args are the status and the one line that says why."""


JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
              dict: "an object"}


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def parse_texts(body: bytes) -> list[str]:
    """The texts of a POST /classify body, {"texts": ["...", ...]}, or a RequestError saying what is wrong."""
    try:
        document = json.loads(body)  # UTF-8 (or UTF-16/32, which JSON allows)
    except (ValueError, RecursionError) as error:
        raise RequestError(400, f"the body is not JSON: {one_line(error)[:200]}") from None
    if not (isinstance(document, dict) and isinstance(document.get("texts"), list)):
        raise RequestError(400, 'expected a JSON object {"texts": ["...", ...]}')
    unknown = sorted(document.keys() - {"texts"})
    if unknown:
        raise RequestError(400, f'unknown field {unknown[0][:40]!r}; expected {{"texts": ["...", ...]}}')
    texts = document["texts"]
    if len(texts) > MAX_TEXTS:
        raise RequestError(413, f"{len(texts):,} texts; at most {MAX_TEXTS:,} per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(400, f"texts[{i}] is {JSON_TYPES.get(type(text), 'not a string')}, not a string")
    return texts


def is_loopback(host: str) -> bool:
    """True for this machine's own addresses: localhost, 127.0.0.0/8, ::1."""
    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a Host header, without its port: "[::1]:8000" -> "::1", "localhost:8000" -> "localhost"."""
    return header[1:].partition("]")[0] if header.startswith("[") else header.rpartition(":")[0] or header


class DeadlineReader(io.RawIOBase):
    """A connection's bytes, every read bounded twice: by the server's idle time, and by the
    deadline of the request being read, so a client that trickles a byte now and then is dropped
    too (a socket timeout alone restarts at every byte)."""

    def __init__(self, connection: socket.socket, idle_seconds: float) -> None:
        super().__init__()
        self.connection, self.idle_seconds, self.deadline = connection, idle_seconds, math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to arrive")
        self.connection.settimeout(min(self.idle_seconds, left))
        return self.connection.recv_into(buffer)


# --------------------------------------------------------------------------- the server

JSON = "application/json; charset=utf-8"
ROUTES = {"/": "GET", "/health": "GET", "/info": "GET", "/classify": "POST"}


def json_line(document: dict) -> bytes:
    return (json.dumps(document, allow_nan=False) + "\n").encode("ascii")


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection: its requests, one after another (HTTP/1.1 keep-alive)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave at once, not 40 ms apart (Nagle and delayed ACKs)
    server: Server

    def setup(self) -> None:
        super().setup()
        self.reader = DeadlineReader(self.connection, self.server.idle_seconds)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.deadline = time.monotonic() + self.server.read_seconds  # until the body is read
        super().handle_one_request()

    def version_string(self) -> str:
        return "gpt2-classifier"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
        """No access log: requests are not printed."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body it will not read: the connection's next bytes are not a request
        if self.routed():
            self.send(200, *self.server.pages[self.path.partition("?")[0]])

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if not self.routed():
            return
        try:
            texts = parse_texts(self.read_body())
        except RequestError as error:
            return self.refuse(*error.args)
        except TimeoutError:
            return self.refuse(408, "the request body took too long to arrive")
        try:
            with self.server.model_lock:  # one batch at a time; the other requests wait here in turn
                if self.server.stopping.is_set():
                    return self.refuse(503, "the server is stopping")
                predictions = self.server.classify_texts(texts)
            answer = json_line({"predictions": [{"label": p["label"], "probabilities": p["probabilities"]}
                                                for p in predictions]})
        except Exception as error:  # noqa: BLE001 - the model failed on this request; keep serving the others
            return self.send(500, json_line({"error": f"the model failed: {one_line(error)[:200]}"}), JSON)
        self.send(200, answer, JSON)

    def read_body(self) -> bytes:
        """The body, read only once its headers promise one of a bounded length (never chunked)."""
        if self.headers.get_content_type() != "application/json":
            raise RequestError(415, "send the body as Content-Type: application/json")
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        lengths = self.headers.get_all("Content-Length", [])
        if not lengths:
            raise RequestError(411, "a Content-Length header is required")
        if len(lengths) > 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
            raise RequestError(400, f"Content-Length {', '.join(lengths)[:40]!r} is not one number")
        length = int(lengths[0])
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"a body of {length:,} bytes; at most {MAX_BODY_BYTES:,} (1 MiB) per request")
        body = self.rfile.read(length)
        if len(body) < length:
            raise RequestError(400, f"the body ended after {len(body):,} of its {length:,} bytes")
        self.reader.deadline = math.inf  # read in time; waiting for the model does not count
        return body

    def routed(self) -> bool:
        """True for a request this method answers at its path; otherwise it is refused: 404 or 405,
        and 403 when it is named for another host while listening on localhost (a web page whose
        name an attacker points at 127.0.0.1, "DNS rebinding", must not reach the model)."""
        host, path = self.headers.get("Host"), self.path.partition("?")[0]
        if host is not None and self.server.loopback_only and not is_loopback(host_name(host)):
            self.refuse(403, f"Host {host[:60]!r} is not this machine; this server answers localhost only")
        elif ROUTES.get(path) != self.command:
            self.refuse_path(path)
        else:
            return True
        return False

    def refuse_path(self, path: str) -> None:
        if path in ROUTES:
            self.refuse(405, f"{self.command[:20]} {path}: use {ROUTES[path]} {path}", [("Allow", ROUTES[path])])
        else:
            self.refuse(404, f"no page {path[:60]!r}; try /, /info, /health or POST /classify")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (an unknown method, a malformed request line, too many
        headers) as one-line JSON; a method it does not answer is a 405 (or 404 off its paths), not a 501."""
        if code == 501:
            return self.refuse_path(self.path.partition("?")[0])
        code = 400 if code == 505 else code  # an HTTP version it does not speak: the request's fault
        if self.request_version == "HTTP/0.9":  # a request line it could not read: still answer with a status line
            self.request_version = "HTTP/1.0"
        self.refuse(code, message or http.HTTPStatus(code).phrase)

    def refuse(self, status: int, message: str, headers=()) -> None:
        """An error's one line of JSON, then the connection ends: its next bytes (maybe an unread
        body) cannot be trusted to be a request."""
        self.close_connection = True
        self.send(status, json_line({"error": message}), JSON, headers)

    def send(self, status: int, body: bytes, content_type: str, headers=()) -> None:
        self.connection.settimeout(self.server.idle_seconds)  # a client that stops reading is dropped too
        self.send_response(status)
        for name, value in (("Content-Type", content_type), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), *headers):
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer is the headers alone
            self.wfile.write(body)


class Server(http.server.ThreadingHTTPServer):
    """One thread per connection, at most max_connections at once, one model lock; `stop` ends
    them all before the process exits."""

    request_queue_size = 2 * MAX_CONNECTIONS  # connections waiting to be accepted (socketserver's 5 drops bursts)
    server_bind = socketserver.TCPServer.server_bind  # not HTTPServer's, whose name lookup may wait on DNS

    def __init__(self, address: tuple[str, int], classify_texts: ClassifyTexts, facts: ModelFacts,
                 idle_seconds: float, read_seconds: float, max_connections: int, log: Log) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.classify_texts, self.log, self.max_connections = classify_texts, log, max_connections
        self.idle_seconds, self.read_seconds = idle_seconds, read_seconds
        self.loopback_only = is_loopback(address[0])
        info = {**asdict(facts), "limits": {"max_body_bytes": MAX_BODY_BYTES, "max_texts": MAX_TEXTS}}
        self.pages = {"/": (PAGE, "text/html; charset=utf-8", PAGE_HEADERS),  # GET path: body, type, headers
                      "/health": (json_line({"status": "ok"}), JSON), "/info": (json_line(info), JSON)}
        self.model_lock, self.stopping = threading.Lock(), threading.Event()
        self.live: dict[socket.socket, threading.Thread] = {}  # each open connection and its thread
        self.live_lock = threading.Lock()
        super().__init__(address, Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request: socket.socket, client_address) -> None:
        """A thread per connection; beyond max_connections, a 503 at once rather than a queue without bound."""
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True)
        with self.live_lock:
            if len(self.live) < self.max_connections:
                self.live[request] = thread
                thread.start()
                return
        with contextlib.suppress(OSError):
            request.settimeout(1)
            request.sendall(BUSY)
        self.shutdown_request(request)

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.live_lock:
                del self.live[request]

    def stop(self, wait_seconds: float) -> bool:
        """Stop listening (the port is free at once), answer 503 to requests still waiting for the
        model, end every connection once its answer is written, and wait for their threads,
        wait_seconds at most: a thread still inside torch when the process exits can abort it.
        True when all of them ended."""
        self.server_close()
        self.stopping.set()
        with self.live_lock:
            live = dict(self.live)
        for connection in live:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RD)  # a thread waiting for a next request reads the end at once
        deadline = time.monotonic() + wait_seconds
        for thread in live.values():
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in live.values())

    def handle_error(self, request, client_address) -> None:
        """A client that went away mid-answer is not an error of the server's; anything else is one line."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            self.log(f"error while answering {client_address[0]}: {type(error).__name__}: {one_line(error)}")


BUSY_BODY = b'{"error": "too many connections at once; retry in a moment"}\n'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: "
        + str(len(BUSY_BODY)).encode() + b"\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" + BUSY_BODY)


def make_server(classify_texts: ClassifyTexts, facts: ModelFacts, host: str = "127.0.0.1", port: int = 8000,
                idle_seconds: float = IDLE_SECONDS, read_seconds: float = READ_SECONDS,
                max_connections: int = MAX_CONNECTIONS, log: Log = print) -> Server:
    """A server listening on host:port (port 0: any free port, then `server.port`), not yet serving:
    call `serve_forever()`. ValueError (one line) when it cannot listen there."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port}: must be in 0..65535")
    try:
        return Server((host, port), classify_texts, facts, idle_seconds, read_seconds, max_connections, log)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} is in use; choose another with --port") from None
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


class Stopped(BaseException):
    """SIGTERM arrived. A BaseException, as KeyboardInterrupt is: socketserver turns any Exception
    raised while it starts a request's thread into a logged error and serves on."""


def print_line(message: str) -> None:
    print(hub.printable(message), flush=True)


def run(classify_texts: ClassifyTexts, facts: ModelFacts, host: str = "127.0.0.1", port: int = 8000,
        log: Log = print_line) -> int:
    """Serve until Ctrl-C (returns 130) or SIGTERM (returns 0): print the address to open, answer,
    then stop (`Server.stop`: the batch being computed may finish, STOP_WAIT_SECONDS at most) and
    print one line. ValueError when it cannot listen (a port in use). Call from the main thread."""
    server = make_server(classify_texts, facts, host, port, log=log)
    if not is_loopback(host):
        log(f"warning: listening on {host}: anyone who can reach port {server.port} can use this model")
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    log(f"serving at http://{shown}:{server.port}/ : open it in a browser, or POST /classify; Ctrl-C stops")

    def stop(signum, frame) -> None:
        raise Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        code = 130
    except Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        finished = server.stop(STOP_WAIT_SECONDS)
    log("stopped" + ("" if finished else f" (a batch was still running after {STOP_WAIT_SECONDS:.0f} s)"))
    return code


# --------------------------------------------------------------------------- the page

SCRIPT = """
const $ = (id) => document.getElementById(id);
const element = (tag, className, text = "") =>
  Object.assign(document.createElement(tag), {className, textContent: text});  // always text, never HTML
const fail = (error) => { $("error").textContent = "Erro: " + error.message; };
let classes = [];

async function getJSON(path, options) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function show(text, prediction) {
  $("label").textContent = prediction.label;
  $("bars").replaceChildren(...classes.map((name) => {
    const probability = prediction.probabilities[name], percent = (100 * probability).toFixed(1);
    const row = element("div", "row"), track = element("span", "track");
    const fill = element("span", name === prediction.label ? "fill top" : "fill");
    row.dataset.probability = String(probability);  // every digit, for programs reading the page
    fill.style.width = percent + "%";
    track.append(fill);
    row.append(element("span", "name", name), track, element("span", "value", percent + " %"));
    return row;
  }));
  $("result").dataset.text = text;
  $("result").hidden = false;
}

async function classify() {
  const text = $("text").value;
  $("error").textContent = "";
  $("classify").disabled = true;
  try {
    show(text, (await getJSON("/classify", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify({texts: [text]})})).predictions[0]);
  } catch (error) {
    fail(error);
  }
  $("classify").disabled = false;
}

async function start() {
  const info = await getJSON("/info");
  classes = info.classes;
  for (const [name, value] of [["classes", classes.join(", ")], ["modelo base", info.model],
                               ["estratégia", info.strategy], ["max_length", info.max_length + " tokens"]]) {
    $("facts").append(element("dt", "", name), element("dd", "", value));
  }
  $("examples").append(...info.examples.map((text) => Object.assign(element("button", "example", text),
    {type: "button", onclick: () => { $("text").value = text; classify(); }})));
  $("classify").disabled = false;
}

$("classify").onclick = classify;
$("text").onkeydown = (event) => { if (event.key === "Enter" && event.ctrlKey) classify(); };
start().catch(fail);
"""

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
textarea { width: 100%; box-sizing: border-box; font: inherit; padding: .5rem; }
button { font: inherit; margin: .5rem .5rem 0 0; cursor: pointer; }
.example { display: block; text-align: left; width: 100%; background: #f4f4f4; border: 1px solid #ddd; padding: .4rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; font-size: .9rem; color: #555; }
dd { margin: 0; }
dd, .name, #label { overflow-wrap: anywhere; }
.row { display: grid; grid-template-columns: 8rem 1fr 4rem; gap: .5rem; align-items: center; margin: .3rem 0; }
.track { background: #eee; height: 1rem; border-radius: 3px; overflow: hidden; }
.fill { display: block; height: 100%; background: #9ab; }
.fill.top { background: #2a7; }
.value { text-align: right; font-variant-numeric: tabular-nums; }
#label { font-size: 1.4rem; }
#error { color: #b00; }
"""

PAGE = f"""<!doctype html>
<html lang="pt-BR">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Classificador GPT-2</title>
<style>{STYLE}</style>
<h1>Classificador GPT-2</h1>
<dl id="facts"></dl>
<label for="text">Mensagem</label>
<textarea id="text" rows="4" placeholder="Digite uma mensagem e clique em Classificar (ou Ctrl+Enter)"></textarea>
<button id="classify" type="button" disabled>Classificar</button>
<p id="error" role="alert"></p>
<section id="result" hidden aria-live="polite">
<p>Classe prevista: <strong id="label"></strong></p>
<div id="bars"></div>
</section>
<h2>Exemplos</h2>
<div id="examples"></div>
<script>{SCRIPT}</script>
""".encode("utf-8")


def csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


PAGE_HEADERS = [  # only this page's own script and style run; it talks to this server alone
    ("Content-Security-Policy", f"default-src 'none'; script-src {csp_hash(SCRIPT)}; style-src {csp_hash(STYLE)}; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
]
