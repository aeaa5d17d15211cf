"""train.py under torchrun: two CPU processes (gloo) train the model that one process trains.

Each test starts `python -m torch.distributed.run --nproc_per_node=2` on 127.0.0.1, on the tiny
random GPT and the SMS slice of test_train.py, and compares with one process in this one. The
claims: the weights and metrics.json are those of one process with the same global batch (a
batch of 3 does not divide by 2, and the last batch leaves one process nothing), for every
strategy; one weight update computes the whole batch's gradient (plain SGD, which unlike AdamW
would show a wrongly scaled gradient); rank 0 alone prints and writes; a failure on any process
stops both, with its message, and leaves nothing behind.

This file is also the program torchrun runs for the last two claims (see the end).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import classify
import data
import distributed
import fastpath
import gpt
import runner
import train
from test_train import (GOLDEN, TINY_GPT, as_golden, assert_same_results, load_metrics, tiny_args,  # noqa: F401
                        without_timing, workspace)  # workspace: a fixture

REPO = Path(__file__).resolve().parents[1]  # torchrun runs this file with the repository on PYTHONPATH
STRATEGIES = ["head", "last-block", "last-2-blocks", "all", "gradual", "lora"]
TIMEOUT = 120  # seconds: far more than a run needs; a hang fails the test instead of the CI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(program: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`program args` in two processes under torchrun, working directory `cwd`."""
    cwd.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(program), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both processes
        process.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for {TIMEOUT} s")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


# --------------------------------------------------------------------------- the same result as one process

GLOBAL_BATCH = ["--batch-size", "3"]  # 46 training texts: 15 batches of 3 (2 + 1 per process), then 1 (1 + 0)


@pytest.fixture(scope="module")
def two_runs(workspace: Path) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Every strategy (--compare) in one process, here, and in two processes under torchrun,
    with the same arguments, each from its own working directory."""
    args = tiny_args(workspace, *GLOBAL_BATCH, "--eval-every", "5", "--compare", ",".join(STRATEGIES), "--out", "run")
    return one_and_two_processes(workspace, args, "one-process", "two-processes")


def one_and_two_processes(workspace: Path, args: list[str], one: str, two: str
                          ) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """train.main(args) here in workspace/one, then under torchrun with 2 processes in workspace/two:
    the two run folders, and torchrun's process."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        (workspace / one).mkdir()
        monkeypatch.chdir(workspace / one)
        assert train.main(args) == 0
    completed = torchrun(REPO / "train.py", args, workspace / two)
    assert completed.returncode == 0, completed.stderr
    return workspace / one / "run", workspace / two / "run", completed


def assert_same_document(one: object, two: object) -> None:
    """Equal, floats within rounding (the processes add in another order): counts, classes,
    confusion matrices and arguments exactly."""
    assert_same_results(two, one, rel=1e-5)


def assert_same_weights(one: Path, two: Path) -> None:
    """The saved classifiers agree, with one exception: the key part of each attention's c_attn
    bias. Its gradient is zero in exact arithmetic (adding one vector to every key shifts all of
    a query's scores alike, and softmax ignores that), so AdamW steps it by rounding noise alone,
    which differs between any two ways of adding up the same gradient."""
    weights_one = classify.load_classifier(one)[0].state_dict()
    weights_two = classify.load_classifier(two)[0].state_dict()
    assert weights_one.keys() == weights_two.keys()
    width = TINY_GPT["n_embd"]
    for name, tensor in weights_one.items():
        other = weights_two[name]
        if name.endswith("attn.c_attn.bias"):
            tensor = torch.cat([tensor[:width], tensor[2 * width :]])  # query and value parts
            other = torch.cat([other[:width], other[2 * width :]])
        torch.testing.assert_close(other, tensor, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_give_one_process_weights_and_metrics(strategy, two_runs):
    single, distributed, _ = two_runs
    assert_same_weights(single / strategy, distributed / strategy)
    one, two = load_metrics(single / strategy), load_metrics(distributed / strategy)
    assert two["timing"]["processes"] == 2 and "processes" not in one["timing"]
    assert_same_document(without_timing(one), without_timing(two))


def test_one_process_gives_what_it_gave_before_the_one_path_change(two_runs):
    """Every strategy, through GPTClassifier.forward, with the plain mean loss per process: the
    metrics.json the code wrote before (commit 5072041), with the same arguments."""
    single, _, _ = two_runs
    for strategy in STRATEGIES:
        golden = json.loads((GOLDEN / f"strategies-{strategy}.json").read_text())
        assert_same_results(as_golden(load_metrics(single / strategy)), golden, strategy)


def test_gradual_unfreezes_on_both_processes_alike(two_runs):
    """The trainable set changes between epochs; both processes rebuild DDP at the same epoch."""
    single, distributed, _ = two_runs
    schedule = [record["trainable"] for record in load_metrics(distributed / "gradual")["history"]]
    assert schedule == [record["trainable"] for record in load_metrics(single / "gradual")["history"]]
    assert schedule[0] != schedule[1]


def without_training_seconds(document: object) -> object:
    """compare.json's rows without the times: each run's, and their spread over the seeds."""
    if isinstance(document, dict):
        return {key: without_training_seconds(value) for key, value in document.items() if key != "training_seconds"}
    return [without_training_seconds(item) for item in document] if isinstance(document, list) else document


def test_rank_0_alone_prints_and_writes(two_runs):
    single, distributed, completed = two_runs
    assert os.listdir(distributed.parent) == ["run"], "nothing else in the working directory"
    assert sorted(p.name for p in distributed.iterdir()) == sorted(p.name for p in single.iterdir())
    for strategy in STRATEGIES:
        assert sorted(os.listdir(distributed / strategy)) == ["classifier.safetensors", "config.json", "metrics.json",
                                                              "mistakes.tsv"]
    assert completed.stdout.count("1. labelled text") == 1, "one process prints"
    assert completed.stdout.count("strategy head:") == 1 and completed.stdout.count("test F1 spam") == 1
    assert "batch size 3 (the global batch" in completed.stdout and "2 processes" in completed.stdout
    table = completed.stdout[completed.stdout.index("strategy  "):completed.stdout.index("whole comparison")]
    assert [line.split()[0] for line in table.splitlines()[1: 1 + len(STRATEGIES)]] == STRATEGIES
    assert max(map(len, table.splitlines())) <= 100, "the table and its notes fit 100 columns"
    rows = [without_training_seconds(row)
            for folder in (single, distributed) for row in json.loads((folder / "compare.json").read_text())["rows"]]
    assert_same_document(rows[: len(STRATEGIES)], rows[len(STRATEGIES) :])


def test_class_weights_under_torchrun_give_one_process_weights(workspace):
    """--class-weights balanced on the real proportions: each process's loss is the weighted mean
    over its share, which `shard` weighs by the share's part of the batch's weight (not of its
    texts), so two processes train the weights one process trains."""
    args = tiny_args(workspace, *GLOBAL_BATCH, "--no-balanced", "--class-weights", "balanced", "--out", "run")
    single, two, _ = one_and_two_processes(workspace, args, "weighted-one-process", "weighted-two-processes")
    assert_same_weights(single, two)
    one = load_metrics(single)
    assert one["class_weights"]["spam"] > 2 > 1 > one["class_weights"]["ham"]  # 33 spam among 200 texts
    assert_same_document(without_timing(one), without_timing(load_metrics(two)))


# --------------------------------------------------------------------------- one weight update


def sgd_epoch(runtime: distributed.Runtime, strategy: str, accumulation_steps: int = 1) -> dict:
    """One epoch of plain SGD (3 steps: batches of 3, 3 and 1) on 7 short texts through
    train.fine_tune, then an evaluation of the training texts and of a one-text split; the same in
    every process (one seed)."""
    torch.manual_seed(0)
    shape = gpt.GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_layers=2, n_heads=2)
    model = classify.GPTClassifier(gpt.GPTModel(shape), num_classes=2)
    classify.apply_strategy(model, strategy)
    token_ids = [torch.randint(0, 100, (n,)).tolist() for n in (3, 5, 8, 2, 7, 4, 6)]
    dataset = data.ClassificationDataset(token_ids, [0, 1, 1, 0, 1, 0, 0])
    one_text = data.ClassificationDataset(token_ids[:1], [0])
    splits = {"train": fastpath.SplitInputs(dataset), "validation": fastpath.SplitInputs(one_text),
              "test": fastpath.SplitInputs(dataset)}
    cfg = train.TrainConfig(batch_size=3, epochs=1, accumulation_steps=accumulation_steps)
    job = runner.Job(cfg, runtime)
    real_optimizer = train.make_optimizer
    train.make_optimizer = lambda model, cfg: torch.optim.SGD(classify.trainable_parameters(model), lr=0.5)
    try:
        training = train.fine_tune(model, splits, strategy, cfg.seed, job)
    finally:
        train.make_optimizer = real_optimizer
    train.restore_state(model, training.best_state)  # one epoch: the weights it ended with
    record = training.history[0]
    fastpath.refresh_caches(model, splits, runtime.device)
    evaluations = [train.evaluate(model, splits[split], runner.Job(train.TrainConfig(batch_size=2), runtime))
                   for split in ("test", "validation")]
    return {"weights": train.trainable_state(model), "train": [record.train_loss, record.train_accuracy],
            "cache": training.cache.used, "evaluation": [[e.loss, e.y_pred] for e in evaluations]}


SGD_STRATEGIES = ["head", "last-block", "all", "lora"]  # cached one position, cached blocks, full path, adapters


def test_one_update_is_the_whole_batch_gradient(tmp_path):
    """Also with --accumulation-steps 2: each process's share in micro-batches, gradients exchanged
    once per update (DDP's no_sync on all but the last), the same update as one process, whole."""
    completed = torchrun(Path(__file__), ["sgd-epoch", str(tmp_path)], tmp_path)
    assert completed.returncode == 0, completed.stderr
    for strategy, accumulation in [(strategy, 1) for strategy in SGD_STRATEGIES] + [("last-block", 2), ("all", 2)]:
        one = sgd_epoch(distributed.Runtime(torch.device("cpu")), strategy)
        assert one["cache"] == (strategy in ("head", "last-block"))
        for rank in (0, 1):
            two = torch.load(tmp_path / f"{strategy}-{accumulation}-rank{rank}.pt")
            assert two["cache"] == one["cache"]
            assert two["weights"].keys() == one["weights"].keys()
            # Tolerances of float32 summation order: the processes add the batch's gradient in another
            # order than one process does (1.6e-6 apart, seen on another 2-core machine).
            for name, tensor in one["weights"].items():
                torch.testing.assert_close(two["weights"][name], tensor, rtol=1e-4, atol=1e-5)
            assert two["train"] == pytest.approx(one["train"], rel=1e-4)
            for (loss_two, predictions_two), (loss_one, predictions_one) in zip(two["evaluation"], one["evaluation"]):
                assert loss_two == pytest.approx(loss_one, rel=1e-4)
                assert predictions_two == predictions_one


# --------------------------------------------------------------------------- failures stop every process


def test_bad_input_on_every_process_stops_both_with_its_message(workspace):
    one_class = workspace / "one-class.txt"
    one_class.write_text("ham\tsee you soon\nham\tok lunch then\nham\tcall me later\n", encoding="utf-8")
    args = tiny_args(workspace, "--out", "run")
    args[args.index("--data") + 1] = str(one_class)
    folder = workspace / "bad-input"
    completed = torchrun(REPO / "train.py", args, folder)
    assert completed.returncode != 0
    assert "[rank 0] error: " in completed.stderr and "two classes" in completed.stderr
    assert list(folder.iterdir()) == []


def test_a_failure_on_rank_0_alone_stops_the_others(workspace):
    """--out is checked by rank 0 alone; the others learn of its failure and stop."""
    (workspace / "not-a-folder").write_text("a file")
    folder = workspace / "unwritable"
    args = tiny_args(workspace, "--out", str(workspace / "not-a-folder" / "run"))
    completed = torchrun(REPO / "train.py", args, folder)
    assert completed.returncode != 0
    assert "[rank 0] error: --out" in completed.stderr
    assert "1. labelled text" not in completed.stdout  # stopped before any work, on both processes
    assert list(folder.iterdir()) == []


def test_a_failure_on_rank_1_mid_training_stops_both_and_leaves_nothing(workspace):
    folder = workspace / "rank-1-fails"
    completed = torchrun(Path(__file__), ["fail-on-rank-1", *tiny_args(workspace, "--out", "runs/run")], folder)
    assert completed.returncode != 0
    assert "[rank 1] error: RuntimeError: a bug (a test's)" in completed.stderr
    assert "epoch 1/2  step" in completed.stdout, "it failed during training"
    assert list(folder.iterdir()) == [], "rank 0 removed its unfinished run folder"


# --------------------------------------------------------------------------- what torchrun runs


def worker(argv: list[str]) -> int:
    """`sgd-epoch FOLDER`: save each strategy's sgd_epoch per rank. `fail-on-rank-1 ARGS`:
    train.main(ARGS), where rank 1's third loss raises."""
    mode, rest = argv[0], argv[1:]
    if mode == "sgd-epoch":
        with distributed.session("cpu") as runtime:
            for strategy, accumulation in [(strategy, 1) for strategy in SGD_STRATEGIES] + [("last-block", 2), ("all", 2)]:
                torch.save(sgd_epoch(runtime, strategy, accumulation),
                           Path(rest[0]) / f"{strategy}-{accumulation}-rank{runtime.rank}.pt")
        return 0
    calls = []
    loss = train.supervised_loss

    def failing_loss(logits, labels, class_weights=None):
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 3:
            raise RuntimeError("a bug (a test's)")
        return loss(logits, labels, class_weights)

    train.supervised_loss = failing_loss
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
