"""benchmarks/gpu.sh, the GPU check, works on a bare machine with the repository copied: offline,
given the SMS file, it runs every job it promises and writes one JSON. A dry run (a 2-block
model, 1 epoch) proves the script on this CPU; it measures nothing. benchmarks/serve_speed.py, for
`classify.py --serve`, has a dry run too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), *args], capture_output=True, text=True,
                          timeout=600, env=environment)


def test_the_gpu_check_runs_every_job_offline_and_writes_one_json(sms_spam_file, tmp_path):
    data = tmp_path / "sms.txt"
    data.write_text("\n".join(sms_spam_file.read_text(encoding="utf-8").splitlines()[:200]) + "\n", encoding="utf-8")
    result = gpu_check(str(data), "--dry-run", "--device", "cpu", env={"GPU_JSON": str(tmp_path / "gpu.json"),
                                                                      "GPT2_HUB_URL": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "gpu.json").read_text())
    assert document["dry_run"] and document["machine"]["torch"] == __import__("torch").__version__
    assert document["machine"]["precision"] == "float32" and document["machine"]["compute_capability"] is None
    assert [job["compile"] for job in document["default_job"]] == [False, True]
    assert all(job["process_seconds"] > 0 and 0 <= job["test_accuracy"] <= 1 for job in document["default_job"])
    assert "--init random" in document["default_job"][0]["command"]
    assert [(row["strategy"], row["method"], row["compile"]) for row in document["speed"]] == [
        ("last-block", "ours", False), ("last-block", "ours", True), ("all", "ours", False), ("all", "ours", True)]
    assert all(row["process_seconds"] >= row["seconds"] > 0 for row in document["speed"])
    assert "default job --compile" in result.stdout


def test_the_gpu_check_names_a_missing_data_file(tmp_path):
    result = gpu_check(str(tmp_path / "no-such-file"))
    assert result.returncode == 2 and "no SMS Spam Collection file" in result.stderr


def test_the_serving_benchmark_runs_end_to_end_in_a_dry_run(tmp_path):
    """benchmarks/serve_speed.py --dry-run: the real `classify.py --serve` on 127.0.0.1, every row
    measured and one `classify.py` call timed (a tiny model, 1 s each): it measures nothing."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_speed.py"), "--dry-run", "--json",
                             str(tmp_path / "serve.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "serve.json").read_text())
    rows = document["models"]["tiny"]["serve"]
    assert document["dry_run"] and list(document["models"]) == ["tiny"]
    assert [(row["clients"], row["texts_per_request"]) for row in rows] == [(1, 1), (2, 1), (2, 32)]
    assert all(row["requests"] >= 1 and 0 < row["p50_ms"] <= row["p99_ms"] for row in rows)
    assert document["models"]["tiny"]["command"]["median_seconds"] > 0
    assert document["models"]["tiny"]["server_exit_code"] == 0  # SIGTERM stopped it cleanly
