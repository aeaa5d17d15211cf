"""The main job end to end: train.py fine-tunes a tiny random GPT on a slice of the SMS data.

In-process `train.main([...])` runs, seconds each: the run writes a classifier that classify.py
loads, its metrics agree with its confusion matrices, one seed gives one result, the
frozen-prefix cache changes nothing, bad input is one line and exit code 2, and a run that
fails leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import classify
import comparison
import data
import distributed
import fastpath
import gpt
import hub
import metrics
import report
import runner
import train
from conftest import REPO, SMS_SPAM_FILE, SMS_SPAM_MISSING, offline_env

TINY_GPT = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128, "vocab_size": 50257}
SMS_LINES = 200  # 33 spam among them: a balanced split of 46 / 6 / 14 texts


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with a tiny GPT-2 config (Hugging Face style) and the first SMS lines."""
    if not SMS_SPAM_FILE.is_file():
        pytest.skip(SMS_SPAM_MISSING)
    root = tmp_path_factory.mktemp("train")
    (root / "tiny-gpt").mkdir()
    (root / "tiny-gpt" / "config.json").write_text(json.dumps(TINY_GPT))
    lines = SMS_SPAM_FILE.read_text(encoding="utf-8").splitlines()[:SMS_LINES]
    (root / "sms.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def tiny_args(workspace: Path, *extra: str) -> list[str]:
    return ["--data", str(workspace / "sms.txt"), "--model", str(workspace / "tiny-gpt"), "--init", "random",
            "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", *extra]


def run_in(folder: Path, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """train.main(args) with `folder` as the working directory; returns (exit code, stdout, stderr)."""
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    code = train.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def without_timing(document: dict) -> dict:
    return {key: value for key, value in document.items() if key != "timing"}


@pytest.fixture(scope="module")
def base_run(workspace: Path) -> tuple[Path, str]:
    """One run of the main job (cached prefix, last-block), shared by several tests."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder = workspace / "first"
        folder.mkdir()
        monkeypatch.chdir(folder)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = train.main(tiny_args(workspace, "--out", "run", "--eval-every", "3"))
    assert code == 0
    return folder / "run", stdout.getvalue()


def load_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# --------------------------------------------------------------------------- the main job


def test_defaults_are_the_books_experiment():
    cfg = runner.config_from_args(runner.build_parser(train.TrainConfig()).parse_args([]), train.TrainConfig)
    assert cfg == train.TrainConfig()
    assert (cfg.model, cfg.init, cfg.strategy, cfg.pooling) == ("gpt2-small", "pretrained", "last-block", "last")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.seed) == (5, 8, 5e-5, 0.1, 123)
    assert cfg.balanced and cfg.data is None and cfg.use_prefix_cache


def test_run_writes_the_three_files_and_reports_each_step(base_run):
    run_dir, stdout = base_run
    assert sorted(p.name for p in run_dir.iterdir()) == ["classifier.safetensors", "config.json", "metrics.json",
                                                        "mistakes.tsv"]
    for step in ("1. labelled text", "2. tokenization", "3. GPT", "4. representation", "5. classification head",
                 "6. supervised loss", "7. weight update"):
        assert step in stdout
    assert "examples/s" in stdout and "time left" in stdout and "validation loss" in stdout
    assert "frozen-prefix cache:" in stdout  # last-block freezes the embeddings and block 0
    assert "confusion matrix" in stdout  # metrics.format_report for each split


def test_metrics_agree_with_their_confusion_matrices(base_run):
    run_dir, _ = base_run
    document = load_metrics(run_dir)
    sizes = {"train": 46, "validation": 6, "test": 14}
    for split, size in sizes.items():
        report = document[split]
        matrix = [[report["confusion_matrix"][true][pred] for pred in ("ham", "spam")] for true in ("ham", "spam")]
        total = sum(map(sum, matrix))
        assert total == size == document["data"][split]["examples"]
        assert report["accuracy"] == pytest.approx((matrix[0][0] + matrix[1][1]) / total)
        assert set(report["per_class"]) == {"ham", "spam"}
    assert [record["epoch"] for record in document["history"]] == [1, 2]
    assert document["seed"] == 123 and document["strategy"] == "last-block"
    assert [check["step"] for check in document["validation_checks"]] == [3, 6, 9, 12]  # --eval-every 3
    assert 0 < document["trainable_parameters"]["trainable"] < document["trainable_parameters"]["total"]


def test_the_saved_weights_are_those_of_the_best_epoch(base_run):
    document = load_metrics(base_run[0])
    accuracies = [record["validation_accuracy"] for record in document["history"]]
    best = document["best_epoch"]
    assert accuracies[best - 1] == max(accuracies)
    assert document["validation"]["accuracy"] == accuracies[best - 1]
    assert document["validation"]["loss"] == pytest.approx(document["history"][best - 1]["validation_loss"], rel=1e-5)


def test_classify_loads_the_run_and_predicts(base_run):
    model, config = classify.load_classifier(base_run[0])
    assert config.label_names == ["ham", "spam"]
    predictions = classify.predict(model, config, ["Free entry! Text WIN to 80086 now", "see you at lunch"])
    assert [p.text for p in predictions] == ["Free entry! Text WIN to 80086 now", "see you at lunch"]
    for prediction in predictions:
        assert prediction.label in ("ham", "spam")
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_a_classifier_exported_for_transformers_is_a_backbone_to_fine_tune(workspace, base_run, monkeypatch, capsys):
    """train.py --model takes a GPT2ForSequenceClassification folder: its GPT-2, not its head."""
    exported = workspace / "exported-hf"
    assert report.classify_command(classify, ["--model", str(base_run[0]), "--export-hf", str(exported)]) == 0
    args = ["--data", str(workspace / "sms.txt"), "--model", str(exported), "--epochs", "1", "--lr", "1e-3",
            "--device", "cpu", "--out", "run"]  # --init pretrained, the default: the exported weights
    code, stdout, stderr = run_in(workspace / "from-hf", args, monkeypatch, capsys)
    assert code == 0, stderr
    assert f"3. GPT: weights from {exported}" in stdout and "pretrained weights" in stdout
    trained, _ = classify.load_classifier(workspace / "from-hf" / "run")
    backbone = gpt.load_gpt2(exported)
    assert torch.equal(trained.gpt.wte.weight, backbone.wte.weight)  # last-block: the embeddings stayed as loaded


def test_one_seed_gives_identical_metrics(workspace, base_run, monkeypatch, capsys):
    code, _, _ = run_in(workspace / "second", tiny_args(workspace, "--out", "run", "--eval-every", "3"),
                        monkeypatch, capsys)
    assert code == 0
    first, second = load_metrics(base_run[0]), load_metrics(workspace / "second" / "run")
    assert without_timing(first) == without_timing(second)


GOLDEN = REPO / "tests" / "fixtures" / "metrics_5072041"
NEW_KEYS = ("precision", "test_unseen", "duplicates", "class_weights")  # metrics.json's since 5072041: what autocast
# computed in (issue 19); the texts also in training, the test on unseen texts, the loss's weights (issue 20)


def assert_same_results(document: object, golden: object, where: str = "", rel: float = 1e-4) -> None:
    """Equal to `golden` (here what the code before the one-path change wrote, commit 5072041):
    counts, classes, confusion matrices and settings exactly; floats within float32 rounding."""
    if isinstance(golden, dict):
        assert document.keys() == golden.keys(), where
        for key in golden:
            assert_same_results(document[key], golden[key], f"{where}.{key}", rel)
    elif isinstance(golden, list):
        assert len(document) == len(golden), where
        for i, (got, want) in enumerate(zip(document, golden)):
            assert_same_results(got, want, f"{where}[{i}]", rel)
    elif isinstance(golden, float):
        assert document == pytest.approx(golden, rel=rel, abs=1e-6), where
    else:
        assert document == golden, where


def as_golden(document: dict) -> dict:
    found = {key: value for key, value in document.items() if key not in ("timing", "arguments", *NEW_KEYS)}
    return {**found, "model": {**found["model"], "source": "tiny-gpt"}}


def test_metrics_are_those_the_code_wrote_before_the_one_path_change(base_run):
    """GPTClassifier.forward now trains, with the frozen blocks' output stored once and the final
    block at the last position only; the numbers are those the separate fast path gave."""
    golden = json.loads((GOLDEN / "base.json").read_text())
    assert_same_results(as_golden(load_metrics(base_run[0])), golden)


@pytest.mark.parametrize(("pooling", "extra"), [("mean", []), ("special", ["--no-cache"]),
                                                ("first", ["--strategy", "gradual"])])
def test_every_pooling_gives_what_it_gave_before_the_one_path_change(pooling, extra, workspace, monkeypatch, capsys):
    code, _, stderr = run_in(workspace / f"pooling-{pooling}", tiny_args(workspace, "--out", "run", "--pooling",
                                                                         pooling, *extra), monkeypatch, capsys)
    assert code == 0, stderr
    golden = json.loads((GOLDEN / f"pooling-{pooling}.json").read_text())
    assert_same_results(as_golden(load_metrics(workspace / f"pooling-{pooling}" / "run")), golden)


@pytest.mark.parametrize("extra", [["--strategy", "last-block"], ["--strategy", "all", "--pooling", "mean"],
                                   ["--strategy", "gradual", "--pooling", "special"],
                                   ["--strategy", "lora", "--no-cache"], ["--strategy", "head", "--no-cache"]],
                         ids=lambda extra: " ".join(extra[1:]))
def test_what_trains_is_the_chapter_s_classifier_its_forward_at_every_step(extra, workspace, monkeypatch, capsys):
    """The one path: every training step runs classify.GPTClassifier.forward (a breakpoint there
    stops at each step), whatever the strategy, pooling or cache; no other module is trained."""
    forward, step = classify.GPTClassifier.forward, torch.optim.AdamW.step
    trained, steps = [], []

    def counted_forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and self.training:
            trained.append(type(self))
        return forward(self, *args, **kwargs)

    def counted_step(self, *args, **kwargs):
        steps.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(classify.GPTClassifier, "forward", counted_forward)
    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    code, _, stderr = run_in(workspace / ("one-path-" + "-".join(extra)), tiny_args(workspace, "--out", "run", *extra),
                             monkeypatch, capsys)
    assert code == 0, stderr
    assert steps and len(trained) == len(steps), "one forward of the classifier for each weight update"
    assert set(trained) == {classify.GPTClassifier}


def test_the_prefix_cache_changes_no_result(workspace, base_run, monkeypatch, capsys):
    code, stdout, _ = run_in(workspace / "uncached", tiny_args(workspace, "--out", "run", "--eval-every", "3",
                                                               "--no-cache", "--compile"), monkeypatch, capsys)
    assert code == 0 and "frozen-prefix cache off (--no-cache)" in stdout
    assert "--compile: only used on CUDA" in stdout
    cached, uncached = load_metrics(base_run[0]), load_metrics(workspace / "uncached" / "run")
    assert cached["prefix_cache"]["used"] and not uncached["prefix_cache"]["used"]
    assert cached["best_epoch"] == uncached["best_epoch"]
    for split in ("train", "validation", "test"):
        assert cached[split]["confusion_matrix"] == uncached[split]["confusion_matrix"]
        assert cached[split]["loss"] == pytest.approx(uncached[split]["loss"], rel=1e-4)
    for a, b in zip(cached["history"], uncached["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["validation_accuracy"] == b["validation_accuracy"]


def test_compare_trains_each_strategy_and_prints_one_table(workspace, monkeypatch, capsys):
    plotting = importlib.util.find_spec("matplotlib") is not None  # optional: pip install -e ".[plot]"
    args = tiny_args(workspace, "--out", "run", "--compare", "head,gradual", *(["--plot"] if plotting else []))
    code, stdout, _ = run_in(workspace / "compare", args, monkeypatch, capsys)
    assert code == 0
    if plotting:
        for name in ("head/confusion_matrix_test.png", "gradual/loss.png", "compare.png"):
            assert (workspace / "compare" / "run" / name).is_file(), name
    run_dir = workspace / "compare" / "run"
    rows = json.loads((run_dir / "compare.json").read_text())["rows"]
    assert [row["strategy"] for row in rows] == ["head", "gradual"]
    assert rows[0]["trainable_parameters"] < rows[1]["trainable_parameters"]
    table = stdout[stdout.index("strategy  "):]
    assert "test F1 spam" in table and "\nhead " in table and "\ngradual " in table
    for strategy in ("head", "gradual"):
        assert {"classifier.safetensors", "config.json", "metrics.json"} <= {p.name for p in (run_dir / strategy).iterdir()}
    gradual = load_metrics(run_dir / "gradual")
    schedule = [record["trainable"] for record in gradual["history"]]
    assert schedule[0] != schedule[1], "gradual unfreezes more of the model in its second epoch"


def results_of(document: dict) -> dict:
    """What a run found, without how it was asked for (argv, --out) or how long it took."""
    return {key: value for key, value in document.items() if key not in ("timing", "arguments")}


def test_a_comparison_gives_each_strategy_what_a_run_of_its_own_gives(workspace, monkeypatch, capsys):
    """The frozen work is done once for the comparison (head's cache deepened from last-block's),
    and changes no number: each strategy's metrics.json equals a separate run's."""
    strategies = ["head", "last-block", "gradual"]
    code, stdout, _ = run_in(workspace / "shared", tiny_args(workspace, "--out", "run", "--compare",
                                                             ",".join(strategies)), monkeypatch, capsys)
    assert code == 0
    assert "frozen work, done once for every run: embeddings and block 0 over 66 texts" in stdout
    assert "then block 1 (the last at the last position only)" in stdout
    assert stdout.count("from the frozen work done once for every run") == 3 + 1  # gradual's second epoch too
    for strategy in strategies:
        code, _, _ = run_in(workspace / "alone" / strategy, tiny_args(workspace, "--out", "run", "--strategy", strategy),
                            monkeypatch, capsys)
        assert code == 0
        alone = load_metrics(workspace / "alone" / strategy / "run")
        assert results_of(load_metrics(workspace / "shared" / "run" / strategy)) == results_of(alone), strategy
    rows = json.loads((workspace / "shared" / "run" / "compare.json").read_text())["rows"]
    old_keys = {"strategy", "trainable_parameters", "training_seconds", "train_accuracy", "validation_accuracy",
                "test_accuracy", "positive_class", "test_precision", "test_recall", "test_f1"}
    assert all(old_keys <= set(row) for row in rows), "compare.json keeps the keys it always had"
    assert rows[1]["test_accuracy"] == load_metrics(workspace / "alone" / "last-block" / "run")["test"]["accuracy"]


@pytest.fixture(scope="module")
def seeded_run(workspace: Path) -> tuple[Path, str]:
    """--compare head,last-block --seeds 2."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder = workspace / "seeded"
        folder.mkdir()
        monkeypatch.chdir(folder)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = train.main(tiny_args(workspace, "--out", "run", "--compare", "head,last-block", "--seeds", "2"))
    assert code == 0
    return folder / "run", stdout.getvalue()


def test_several_seeds_keep_every_run_and_the_first_is_the_plain_run(seeded_run, base_run):
    run_dir, stdout = seeded_run
    assert sorted(p.name for p in run_dir.iterdir()) == ["compare.json", "head", "last-block"]
    assert sorted(p.name for p in (run_dir / "last-block").iterdir()) == ["seed-123", "seed-124"]
    first, second = load_metrics(run_dir / "last-block" / "seed-123"), load_metrics(run_dir / "last-block" / "seed-124")
    assert (first["seed"], first["training_seed"], second["seed"], second["training_seed"]) == (123, 123, 123, 124)
    plain = load_metrics(base_run[0])  # --seed 123 alone (with --eval-every 3, which adds checks only)
    same = {key for key in results_of(plain) if key not in ("validation_checks", "training_seed")}
    assert {key: first[key] for key in same} == {key: plain[key] for key in same}
    assert first["data"] == second["data"], "the split stays: only the training's randomness changes"
    assert first["history"] != second["history"]
    assert "seeds" not in first["arguments"]["config"] and "--seeds" in first["arguments"]["argv"]
    assert "strategy last-block, training seed 124:" in stdout


def test_compare_json_holds_each_run_the_spread_and_the_paired_tests(seeded_run):
    run_dir, stdout = seeded_run
    document = json.loads((run_dir / "compare.json").read_text())
    assert document["seeds"] == [123, 124] and document["reference"] == "last-block"
    assert document["frozen_work"]["seconds"] > 0 and document["total_seconds"] > 0
    head, last_block = document["rows"]
    for row in (head, last_block):
        runs = [load_metrics(run_dir / row["strategy"] / f"seed-{seed}") for seed in (123, 124)]
        accuracies = [run["test"]["accuracy"] for run in runs]
        assert [run["test_accuracy"] for run in row["runs"]] == accuracies
        spread = row["spread"]["test_accuracy"]
        assert (spread["min"], spread["max"]) == (min(accuracies), max(accuracies))
        assert spread["mean"] == pytest.approx(sum(accuracies) / 2) == row["test_accuracy"]
        assert spread["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2**0.5)
        assert set(row["spread"]) >= {"training_seconds", "test_f1", "validation_accuracy"}
    assert "vs_reference" not in last_block
    pairs = head["vs_reference"]["pairs"]
    assert [(pair["seed"], pair["reference_seed"]) for pair in pairs] == [(123, 123), (124, 124)]
    for pair in pairs:
        assert pair["p_value"] == metrics.mcnemar_exact(pair["right_only_here"], pair["right_only_reference"])
    table = stdout[stdout.index("strategy  "):]
    assert "vs last-block" in table and " ± " in table and "reference" in table
    block = table[: table.index("whole comparison")].splitlines()
    assert max(len(line) for line in block) <= 100, "the table and its notes fit 100 columns"
    assert "mean ± standard deviation over 2 training seeds (123, 124)" in table


def test_seeds_without_compare_repeat_the_one_strategy(workspace, monkeypatch, capsys):
    code, stdout, _ = run_in(workspace / "one-strategy", tiny_args(workspace, "--out", "run", "--strategy", "head",
                                                                   "--seeds", "5,6"), monkeypatch, capsys)
    assert code == 0
    run_dir = workspace / "one-strategy" / "run"
    assert sorted(p.name for p in (run_dir / "head").iterdir()) == ["seed-5", "seed-6"]
    document = json.loads((run_dir / "compare.json").read_text())
    assert document["reference"] == "head" and [row["seeds"] for row in document["rows"]] == [[5, 6]]


def test_the_seeds_option():
    assert comparison.parse_seeds("1", 123) == [] and comparison.parse_seeds("3", 123) == [123, 124, 125]
    assert comparison.parse_seeds("7,", 123) == [7] and comparison.parse_seeds(" 7, 9 ", 123) == [7, 9]
    for bad in ("0", "-2", "x", "1,1", ",", ""):
        with pytest.raises(ValueError, match="--seeds"):
            comparison.parse_seeds(bad, 123)
    help_text = " ".join(runner.build_parser(train.TrainConfig()).format_help().split())
    assert "the split and, with --init random, the random GPT stay fixed by --seed" in help_text
    assert comparison.reference_strategy(None, ["head", "lora"]) == "head"
    assert comparison.reference_strategy(None, ["head", "last-block"]) == "last-block"
    assert comparison.reference_strategy("lora", ["head", "lora"]) == "lora"


def test_your_own_csv_files_with_three_classes(workspace, monkeypatch, capsys):
    """Separate train/validation/test CSV files, named columns, more than two classes."""
    lines = (workspace / "sms.txt").read_text(encoding="utf-8").splitlines()

    def write_csv(name: str, part: list[str]) -> Path:
        rows = ["message,kind"]
        for line in part:
            label, text = line.split("\t", 1)
            kind = "spam" if label == "spam" else ("question" if "?" in text else "chat")
            rows.append('"' + text.replace('"', '""') + '",' + kind)
        path = workspace / name
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        return path

    paths = [write_csv("train.csv", lines[:140]), write_csv("val.csv", lines[140:170]),
             write_csv("test.csv", lines[170:])]
    args = tiny_args(workspace, "--out", "run", "--no-balanced", "--text-column", "message", "--label-column",
                     "kind", "--validation-data", str(paths[1]), "--test-data", str(paths[2]))
    args[args.index("--data") + 1] = str(paths[0])
    code, _, stderr = run_in(workspace / "csv", args, monkeypatch, capsys)
    assert code == 0, stderr
    document = load_metrics(workspace / "csv" / "run")
    assert document["data"]["label_names"] == ["chat", "question", "spam"]
    assert [document["data"][split]["examples"] for split in ("train", "validation", "test")] == [140, 30, 30]
    assert set(document["test"]["confusion_matrix"]) == {"chat", "question", "spam"}


# --------------------------------------------------------------------------- bad input: one line, exit code 2


def write_one_class_file(workspace: Path) -> Path:
    path = workspace / "only-ham.txt"
    path.write_text("ham\tsee you soon\nham\tok lunch then\nham\tcall me later\n", encoding="utf-8")
    return path


def refuse_network(*args, **kwargs):
    raise ConnectionError("https://huggingface.co/gpt2/resolve/main/model.safetensors: network unreachable")


BAD_INPUTS = {
    "unknown strategy": (["--strategy", "everything"], "last-block"),
    "unknown pooling": (["--pooling", "middle"], "pooling"),
    "unknown compared strategy": (["--compare", "head,most"], "last-block"),
    "more blocks than the model has": (["--strategy", "last-3-blocks"], "only 2 blocks"),
    "unknown model": (["--model", "gpt2-tiny"], "gpt2-small"),
    "missing data file": (["--data", "no/such/file.txt"], "no such file"),
    "max-length beyond the context": (["--max-length", "129"], "context length"),
    "unknown device": (["--device", "tpu"], "--device"),
    "validation file without a test file": (["--validation-data", "no/such/val.csv"], "--test-data"),
    "a reference that is not compared": (["--compare", "head,all", "--reference", "lora"], "not among"),
    "a strategy compared twice": (["--compare", "head,head"], "--seeds"),
    "no seeds": (["--seeds", "0"], "number of seeds"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_arguments_give_one_line_and_exit_code_2(case, workspace, monkeypatch, capsys):
    extra, message = BAD_INPUTS[case]
    code, _, stderr = run_in(workspace / "bad", tiny_args(workspace, "--out", "run", *extra), monkeypatch, capsys)
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr
    assert not (workspace / "bad" / "run").exists()


def test_plot_without_matplotlib_is_one_line_before_any_work(workspace, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed
    code, stdout, stderr = run_in(workspace / "no-matplotlib", tiny_args(workspace, "--out", "run", "--plot"),
                                  monkeypatch, capsys)
    assert code == 2 and "pip install matplotlib" in stderr and stderr.count("\n") == 1
    assert "1. labelled text" not in stdout and list((workspace / "no-matplotlib").iterdir()) == []


def test_lora_rank_is_checked_before_any_work():
    # Before the check it failed only in apply_strategy, after the data and weights were loaded.
    with pytest.raises(ValueError, match="--lora-rank 0: must be between 1 and the model's width"):
        runner.check_config(train.TrainConfig(strategy="lora", lora_rank=0))
    runner.check_config(train.TrainConfig(strategy="head", lora_rank=0))  # unused by other strategies


def test_one_class_data_is_refused(workspace, monkeypatch, capsys):
    args = tiny_args(workspace, "--out", "run") + ["--data", str(write_one_class_file(workspace))]
    code, _, stderr = run_in(workspace / "one-class", args, monkeypatch, capsys)
    assert code == 2 and "class" in stderr and stderr.count("\n") == 1
    assert list((workspace / "one-class").iterdir()) == []


def test_no_network_names_the_offline_options(workspace, monkeypatch, capsys):
    monkeypatch.setattr(hub, "fetch", refuse_network)
    args = ["--data", str(workspace / "sms.txt"), "--model", "gpt2-small", "--out", "run", "--device", "cpu"]
    code, _, stderr = run_in(workspace / "offline", args, monkeypatch, capsys)
    assert code == 2 and stderr.count("\n") == 1
    for option in ("network unreachable", "--data PATH", "--model PATH", "--init random"):
        assert option in stderr
    assert list((workspace / "offline").iterdir()) == []


def test_missing_tokenizer_files_give_one_line(workspace, monkeypatch, capsys):
    def no_tokenizer(name="gpt2"):
        raise ValueError("GPT-2's BPE files: gpt2_bpe/vocab.bpe is damaged; restore gpt2_bpe/ (git checkout -- gpt2_bpe)")

    monkeypatch.setattr(data, "get_tokenizer", no_tokenizer)
    code, _, stderr = run_in(workspace / "no-bpe", tiny_args(workspace, "--out", "run"), monkeypatch, capsys)
    assert code == 2 and "git checkout -- gpt2_bpe" in stderr and stderr.count("\n") == 1
    assert list((workspace / "no-bpe").iterdir()) == []


def test_a_fresh_clone_trains_and_classifies_with_no_network_and_no_environment(workspace, tmp_path):
    """`python train.py --data FILE --init random`, then classify.py, as a user types them offline."""
    env = offline_env(tmp_path)
    commands = [[sys.executable, str(REPO / "train.py"), *tiny_args(workspace, "--epochs", "1", "--out", "run")],
                [sys.executable, str(REPO / "classify.py"), "--model", "run", "--device", "cpu", "Win a prize now"]]
    for command in commands:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert result.stdout.split("\t")[0] in ("ham", "spam")
    assert list((tmp_path / "tiktoken-cache").iterdir()) == [] and list((tmp_path / "home").iterdir()) == []


def test_unwritable_out_is_refused_before_training(workspace, monkeypatch, capsys):
    (workspace / "a-file").write_text("not a folder")
    args = tiny_args(workspace, "--out", str(workspace / "a-file" / "run"))
    code, stdout, stderr = run_in(workspace / "unwritable", args, monkeypatch, capsys)
    assert code == 2 and "--out" in stderr and stderr.count("\n") == 1
    assert "1. labelled text" not in stdout  # refused before any work


# --------------------------------------------------------------------------- nothing half-written


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("failure", [Boom, KeyboardInterrupt])
def test_a_failure_mid_training_leaves_no_run_folder(failure, workspace, monkeypatch, capsys):
    calls = []
    real_loss = train.supervised_loss

    def failing_loss(logits, labels, class_weights=None):
        calls.append(1)
        if len(calls) == 3:
            raise failure("stopped mid-training")
        return real_loss(logits, labels, class_weights)

    monkeypatch.setattr(train, "supervised_loss", failing_loss)
    folder = workspace / f"failing-{failure.__name__}"
    args = tiny_args(workspace, "--out", "runs/nested/run")
    if failure is Boom:
        with pytest.raises(Boom):  # a bug is a traceback, but still leaves nothing behind
            run_in(folder, args, monkeypatch, capsys)
    else:
        assert run_in(folder, args, monkeypatch, capsys)[0] == 130
    assert len(calls) == 3
    assert list(folder.iterdir()) == [], "no run folder, no partial folder, not even the parents made for it"


# --------------------------------------------------------------------------- the loop's bookkeeping


def test_best_epoch_restore_undoes_blocks_unfrozen_after_it():
    """gradual: epoch 1 trains the head only, later epochs unfreeze blocks. If epoch 1 is the best,
    the kept weights must hold those blocks as they were then (untrained), not as training left them."""
    torch.manual_seed(0)
    shape = gpt.GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_layers=2, n_heads=2)
    model = classify.GPTClassifier(gpt.GPTModel(shape), num_classes=2)
    classify.apply_strategy(model, "gradual", epoch=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    token_ids = [torch.randint(0, 100, (n,)).tolist() for n in (3, 5, 8, 2, 7, 4, 6, 9)]
    dataset = data.ClassificationDataset(token_ids, [0, 1] * 4)
    splits = {name: fastpath.SplitInputs(dataset) for name in ("train", "validation", "test")}
    cfg = train.TrainConfig(epochs=3, batch_size=4, lr=1e-2, strategy="gradual")
    accuracies = iter([1.0, 0.5, 0.5])  # epoch 1 is the best

    def fake_evaluate(model, split, job):
        accuracy = next(accuracies)
        return train.Evaluation(loss=1.0, y_true=[0, 1], y_pred=[0, 1] if accuracy == 1.0 else [1, 1])

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(train, "evaluate", fake_evaluate)
        job = runner.Job(cfg, distributed.Runtime(torch.device("cpu")), log=print)
        result = train.fine_tune(model, splits, "gradual", 0, job)
    assert result.best_epoch == 1
    assert [record.trainable for record in result.history] == [
        "head + final LayerNorm", "head + final LayerNorm + block 1", "head + final LayerNorm + blocks 0-1"]
    assert not torch.equal(model.gpt.h[0].mlp.c_fc.weight, before["gpt.h.0.mlp.c_fc.weight"]), "block 0 trained"
    train.restore_state(model, result.best_state)
    for name, param in model.named_parameters():
        if name.startswith("gpt.h."):
            assert torch.equal(param, before[name]), f"{name} was frozen at the best epoch"
    assert not torch.equal(model.head.weight, before["head.weight"]), "the head trained in epoch 1"


@pytest.mark.parametrize(("seeds", "message"), [("1000000000", "from 1 to 100"), ("1,99999999999999999999", "2**63-1"),
                                                ("-5,3", "2**63-1"), ("9223372036854775807", "from 1 to 100")])
def test_seeds_are_bounded_and_checked_before_anything_is_built(seeds, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        comparison.parse_seeds(seeds, 123)
    assert len(str(error.value)) < 200
    assert comparison.parse_seeds("100", 9223372036854775700) == list(range(9223372036854775700, 9223372036854775800))


@pytest.mark.parametrize(("compare", "message"), [(",", "no strategy named"), (" , ,", "no strategy named"),
                                                  ("last-block,last-1-blocks", "'last-1-blocks' trains what 'last-block' trains"),
                                                  (",".join(["head"] * 20000), "'head' is listed twice")])
def test_compared_strategies_are_checked_by_meaning_in_one_short_line(compare, message, workspace, monkeypatch, capsys):
    code, stdout, stderr = run_in(workspace / "bad-compare", tiny_args(workspace, "--out", "run", "--compare", compare),
                                  monkeypatch, capsys)
    assert code == 2 and message in stderr and stderr.count("\n") == 1 and len(stderr) < 300
    assert "1. labelled text" not in stdout


def test_an_interrupted_comparison_keeps_the_runs_it_finished(workspace, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) in the second of two runs: the first, finished, stays; nothing of the
    second, and no compare.json, which needs both."""
    train_calls: list[int] = []
    real_fine_tune = train.fine_tune

    def fine_tune(*args):
        train_calls.append(1)
        if len(train_calls) == 2:
            raise KeyboardInterrupt("Ctrl-C in the second run")
        return real_fine_tune(*args)

    monkeypatch.setattr(train, "fine_tune", fine_tune)
    code, _, stderr = run_in(workspace / "interrupted", tiny_args(workspace, "--out", "run", "--compare",
                                                                  "head,last-block"), monkeypatch, capsys)
    run_dir = (workspace / "interrupted" / "run").resolve()
    assert code == 130 and "interrupted: 1 finished run kept in run\n" in stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["head"]
    assert {"classifier.safetensors", "config.json", "metrics.json", "mistakes.tsv"} <= {
        p.name for p in (run_dir / "head").iterdir()}
    assert [p.name for p in (workspace / "interrupted").iterdir()] == ["run"], "no hidden partial folder left"


@settings(max_examples=50, deadline=None)
@given(works=st.lists(st.integers(1, 500), min_size=1, max_size=200), step=st.floats(0.01, 5.0))
def test_progress_says_at_most_ten_things_never_in_the_first_seconds_and_the_time_left(works, step):
    now, told = [0.0], []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(report.time, "perf_counter", lambda: now[0])
        ticker = report.Ticker("work", sum(works), told.append, started=0.0)
        for count in works:
            now[0] += step * count  # each unit of work costs the same: the time left is exact
            ticker.add(count)
    assert len(told) <= 10
    for line in told:
        match = re.fullmatch(r"work: (\d+)% done, time left (\d+):(\d\d):(\d\d)", line)
        percent, hours, minutes, seconds = map(int, match.groups())
        remaining = step * sum(works) * (1 - int(percent) / 100)
        assert abs(hours * 3600 + minutes * 60 + seconds - remaining) <= step * sum(works) * 0.01 + 1
    if step * sum(works) <= 2:
        assert told == [], "quick work stays quiet"
