"""How fast does `python classify.py --serve` answer, and how does that compare with one
`python classify.py` call per text?

For each model (tiny: 2 blocks of width 16; gpt2-small: its 124M-parameter shape with random
weights, as `train.py --init random` builds it), saved as a run folder in a temporary directory, it
starts the real command `python classify.py --model RUN --serve --port 0` on 127.0.0.1 and drives
POST /classify from client threads (http.client, one keep-alive connection each) for a fixed time:

    1 client,  1 text per request    the latency one user sees
    N clients, 1 text per request    many users at once (the model serves one request at a time)
    N clients, 32 texts per request  programs sending batches

and reports requests/s, texts/s and the p50/p99 latency of a request. Then it times whole
`python classify.py --model RUN "text"` processes (start Python, load the model, classify one text,
exit), the way the chapter's command answers without a server.

    python benchmarks/serve_speed.py                      # about 5 minutes on a 2-core CPU
    python benchmarks/serve_speed.py --seconds 5 --clients 8 --models tiny --json serve.json
    python benchmarks/serve_speed.py --dry-run            # a check of the script: tiny, 1 s; it measures nothing

Never run by CI (tests/test_benchmarks.py runs --dry-run). Bounded: it talks to 127.0.0.1 only,
with at most MAX_CLIENTS clients for at most MAX_SECONDS per measurement.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # torch warns at import when NumPy is missing; run from anywhere
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import http.client
import json
import math
import os
import platform
import re
import select
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import replace

import torch

import classify
import gpt

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny": gpt.GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_layers=2, n_heads=2),
          "gpt2-small": replace(gpt.PRESETS["gpt2-small"], vocab_size=50257)}
MAX_CLIENTS, MAX_SECONDS, MAX_ATTEMPTS = 64, 120, 10
QUIET = 0.10  # a row measured while other processes took more of the CPU is measured again (--attempts)
MESSAGES = [  # SMS-sized texts, 8 to 40 tokens, as the chapter's data set
    "Are we still on for lunch at 1? I can bring the notes.",
    "WINNER!! You have been selected to receive a £900 prize reward. Call 09061701461 to claim now.",
    "Sorry, I'll call you later, I'm in a meeting.",
    "URGENT! Your mobile number has been awarded £2000. Text CLAIM to 81010 before it expires.",
    "Ok lar... see you at the station at 6",
    "Free entry in 2 a weekly competition to win FA Cup final tickets. Text FA to 87121 to receive entry question.",
    "Did you get the book I left on your desk? Let me know what you think of chapter 6.",
    "Thanks for your subscription to Ringtone UK, your mobile will be charged £5/month. Reply STOP to cancel.",
    "Happy birthday! Hope you have a great day, talk soon",
    "Can you pick up some milk and bread on the way home please",
    "You have 1 new voicemail. Please call 08719181513 now to listen.",
    "I'm running 10 minutes late, start without me",
]
JSON = {"Content-Type": "application/json"}


def save_run(name: str, folder: Path) -> tuple[Path, int]:
    """A run folder for `name`'s shape with random weights (seed 0), as classify.py loads it; its parameter count."""
    torch.manual_seed(0)
    model = classify.GPTClassifier(gpt.GPTModel(MODELS[name]), 2)
    max_length = min(120, MODELS[name].context_length - 1)  # 120: train.py's default
    classify.save_classifier(model, folder / name, ["ham", "spam"], max_length)
    return folder / name, sum(p.numel() for p in model.parameters())


def start_server(run_dir: Path) -> tuple[subprocess.Popen, int]:
    """The real command, on a free port of 127.0.0.1; its port."""
    process = subprocess.Popen([sys.executable, str(REPO / "classify.py"), "--model", str(run_dir), "--serve",
                                "--host", "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore:Failed to initialize NumPy"})
    readable, _, _ = select.select([process.stdout], [], [], 300)
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", process.stdout.readline() if readable else "")
    if not match:
        process.kill()
        raise RuntimeError(f"the server did not start: {process.communicate()}")
    return process, int(match.group(1))


def request_bodies(texts_per_request: int) -> list[bytes]:
    """Bodies that walk through MESSAGES, so requests differ the way real traffic does."""
    return [json.dumps({"texts": [MESSAGES[(start + i) % len(MESSAGES)] for i in range(texts_per_request)]}).encode()
            for start in range(len(MESSAGES))]


def client(port: int, bodies: list[bytes], offset: int, stop_at: float, latencies: list[float],
           errors: list[str]) -> None:
    """One keep-alive connection sending bodies[offset], bodies[offset + 1], ... until stop_at."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        i = offset
        while True:  # one request at least, then until stop_at
            start = time.perf_counter()
            connection.request("POST", "/classify", bodies[i % len(bodies)], JSON)
            response = connection.getresponse()
            body = response.read()
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                errors.append(f"{response.status} {body[:100]!r}")
            i += 1
            if time.perf_counter() >= stop_at:
                break
    except (OSError, http.client.HTTPException) as error:
        errors.append(f"{type(error).__name__}: {error}")
    finally:
        connection.close()


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value at least `fraction` of the values do not exceed."""
    return sorted_values[min(len(sorted_values), max(1, math.ceil(fraction * len(sorted_values)))) - 1]


def cpu_seconds(server_pid: int | None = None) -> tuple[float, float]:
    """(CPU seconds every process on this machine has used, those the server, this benchmark and
    its finished children have used), from Linux's /proc; (nan, nan) elsewhere."""
    try:
        with open("/proc/stat") as file:
            fields = [int(value) for value in file.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        ours = 0
        for pid in (os.getpid(), server_pid) if server_pid else (os.getpid(),):
            with open(f"/proc/{pid}/stat") as file:  # utime, stime, and those of waited-for children
                ours += sum(int(value) for value in file.read().rpartition(")")[2].split()[11:15])
    except (OSError, ValueError, IndexError):
        return math.nan, math.nan
    ticks = os.sysconf("SC_CLK_TCK")
    return busy / ticks, ours / ticks


def others_share(busy_before: float, ours_before: float, elapsed: float, server_pid: int | None = None) -> float:
    """The share of the machine's CPU time other processes took since (busy_before, ours_before);
    nan where /proc does not tell."""
    busy_after, ours_after = cpu_seconds(server_pid)
    share = ((busy_after - busy_before) - (ours_after - ours_before)) / (elapsed * (os.cpu_count() or 1))
    return share if math.isnan(share) else max(0.0, share)


def measure(port: int, server_pid: int, clients: int, texts_per_request: int, seconds: float) -> dict:
    """`clients` threads sending requests of `texts_per_request` texts for `seconds`; every request
    in flight at the end is waited for and counted. `others_cpu` is the share of the machine's CPU
    time that other processes took meanwhile: torch's threads wait at every parallel step for a
    core another process holds, so on a busy machine every number here is worse."""
    bodies = request_bodies(texts_per_request)
    latencies: list[float] = []
    errors: list[str] = []
    for i in range(len(bodies)):  # warm up, one request per body: a first forward pass at each shape is slower
        client(port, bodies, i, 0.0, [], errors)
    busy_before, ours_before = cpu_seconds(server_pid)
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(port, bodies, i, started + seconds, latencies, errors))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    others = others_share(busy_before, ours_before, elapsed, server_pid)
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, the first: {errors[0]}")
    latencies.sort()
    return {"clients": clients, "texts_per_request": texts_per_request, "seconds": round(elapsed, 2),
            "requests": len(latencies), "requests_per_second": round(len(latencies) / elapsed, 2),
            "texts_per_second": round(len(latencies) * texts_per_request / elapsed, 1),
            "p50_ms": round(1000 * percentile(latencies, 0.50), 1),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 1), "others_cpu": round(others, 3)}


def wait_for_quiet(most_seconds: float = 120) -> None:
    """Wait until the whole machine used under QUIET of its CPU for 2 s (most_seconds at most): the
    server is idle between measurements, so what runs then is other processes."""
    deadline = time.monotonic() + most_seconds
    while time.monotonic() < deadline:
        busy_before, _ = cpu_seconds()
        time.sleep(2)
        busy_after, _ = cpu_seconds()
        if not (busy_after - busy_before) / (2 * (os.cpu_count() or 1)) > QUIET:  # nan: cannot tell, go on
            return


def quietest(attempt, attempts: int) -> dict:
    """`attempt()` (a measurement with its "others_cpu") once the machine is quiet, again while other
    processes took more than QUIET of the CPU meanwhile, `attempts` times at most: the one they
    disturbed least."""
    rows: list[dict] = []
    while len(rows) < attempts and not (rows and rows[-1]["others_cpu"] <= QUIET):
        if attempts > 1:
            wait_for_quiet()
        rows.append(attempt())
    return {**min(rows, key=lambda row: row["others_cpu"]), "attempts": len(rows)}


def time_command(run_dir: Path, runs: int) -> dict:
    """Wall seconds of whole `python classify.py --model RUN "text"` processes."""
    seconds = []
    busy_before, ours_before = cpu_seconds()
    started = time.perf_counter()
    for i in range(runs):
        start = time.perf_counter()
        command = [sys.executable, str(REPO / "classify.py"), "--model", str(run_dir), MESSAGES[i % len(MESSAGES)]]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        seconds.append(time.perf_counter() - start)
    others = others_share(busy_before, ours_before, time.perf_counter() - started)
    return {"runs": runs, "median_seconds": round(statistics.median(seconds), 2),
            "seconds": [round(s, 2) for s in seconds], "others_cpu": round(others, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,gpt2-small", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--clients", type=int, default=4, help=f"N, the concurrent clients (at most {MAX_CLIENTS})")
    parser.add_argument("--seconds", type=float, default=20, help=f"per measurement (at most {MAX_SECONDS})")
    parser.add_argument("--attempts", type=int, default=3, help=f"measurements per row at most, while other "
                        f"processes take over {QUIET * 100:.0f}%% of the CPU (at most {MAX_ATTEMPTS})")
    parser.add_argument("--command-runs", type=int, default=3, help="`python classify.py` processes timed per model")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model, 2 clients, 1 s, 1 command: a check of the script")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.models, args.clients, args.seconds, args.command_runs, args.attempts = "tiny", 2, 1.0, 1, 1
    models = args.models.split(",")
    if not (set(models) <= MODELS.keys() and 1 <= args.clients <= MAX_CLIENTS and 0 < args.seconds <= MAX_SECONDS
            and 1 <= args.attempts <= MAX_ATTEMPTS and args.command_runs >= 1):
        parser.error(f"--models of {', '.join(MODELS)}, --clients in 1..{MAX_CLIENTS}, "
                     f"--seconds in (0, {MAX_SECONDS}], --attempts in 1..{MAX_ATTEMPTS}, --command-runs at least 1")
    machine = {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(),
               "load_average_before": [round(load, 2) for load in os.getloadavg()]}
    document = {"dry_run": args.dry_run, "machine": machine, "models": {}}
    columns = ("clients", "texts/req", "req/s", "texts/s", "p50 ms", "p99 ms", "requests", "others")
    print(f"{'model':<11}" + "".join(f"{column:>10}" for column in columns))
    with tempfile.TemporaryDirectory() as folder:
        for name in models:
            run_dir, parameters = save_run(name, Path(folder))
            process, port = start_server(run_dir)
            try:
                rows = [quietest(lambda: measure(port, process.pid, clients, texts, args.seconds), args.attempts)
                        for clients, texts in ((1, 1), (args.clients, 1), (args.clients, 32))]
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
            if process.returncode != 0:
                print(f"{name}: the server exited with code {process.returncode} after SIGTERM, not 0", flush=True)
            for row in rows:
                values = ("clients", "texts_per_request", "requests_per_second", "texts_per_second", "p50_ms", "p99_ms",
                          "requests")
                print(f"{name:<11}" + "".join(f"{row[value]:>10}" for value in values) + f"{row['others_cpu']:>10.0%}",
                      flush=True)
            command = quietest(lambda: time_command(run_dir, args.command_runs), args.attempts)
            print(f"{name:<11} python classify.py --model RUN \"text\": {command['median_seconds']} s per call "
                  f"(median of {command['runs']}; other processes took {command['others_cpu']:.0%} of the CPU)",
                  flush=True)
            document["models"][name] = {"parameters": parameters, "serve": rows, "command": command,
                                        "server_exit_code": process.returncode}
    # other work on the machine skews every number
    document["machine"]["load_average_after"] = [round(load, 2) for load in os.getloadavg()]
    print(f"load average (1, 5, 15 min) before {document['machine']['load_average_before']}, "
          f"after {document['machine']['load_average_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
