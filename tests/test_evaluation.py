"""What a test score is worth (evaluation.py, issue 20): texts seen in training and test alike,
--dedup, baselines without GPT-2 in the comparison, the mistakes, and class weights.

The claims: duplicate counts are those of comparing every pair; --dedup leaves no text in two
splits and none twice; the unseen-only test metrics are the chapter's metrics on those texts;
the class weights are n / (K count_k) and the weighted loss is its definition; the baselines are
deterministic, the majority predicts the training majority and bag-of-words is the L2 logistic
regression's optimum; mistakes.tsv lists exactly the misclassified test texts and reads back
through the csv module; a baseline is a row of the comparison like any strategy.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import types
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import data
import distributed
import evaluation
import metrics
import report
import runner
import train
from test_train import load_metrics, run_in, tiny_args, workspace  # noqa: F401 - workspace: a fixture

# Few letters, whitespace, and é composed (U+00E9) or as e + a combining accent (U+0301), so that
# drawn texts repeat, differ by surrounding whitespace alone, or by composition alone.
TEXTS = st.text(alphabet=["a", "b", " ", "\t", "\n", "\u00e9", "e", "\u0301"], max_size=5)


def same_text(a: str, b: str) -> bool:
    """The definition, written out: equal after NFC normalisation and stripping surrounding whitespace."""
    return unicodedata.normalize("NFC", a).strip() == unicodedata.normalize("NFC", b).strip()


def labelled(texts: list[str], labels: list[int] | None = None) -> data.LabelledTexts:
    return data.LabelledTexts(texts, labels or [i % 2 for i in range(len(texts))], ["ham", "spam"])


# --------------------------------------------------------------------------- duplicates


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(TEXTS, max_size=12), reference=st.lists(TEXTS, max_size=12))
def test_texts_seen_in_training_are_those_equal_to_some_training_text(texts, reference):
    expected = [any(same_text(text, known) for known in reference) for text in texts]
    assert data.seen_in(texts, reference) == expected


def test_what_counts_as_a_duplicate():
    assert data.seen_in(["caf\u00e9", " cafe\u0301\n", "Cafe\u0301", "ca fé"], ["café"]) == [True, True, False, False]


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.lists(TEXTS, max_size=10), min_size=1, max_size=3))
def test_dedup_leaves_no_text_twice_and_keeps_each_first_occurrence(parts):
    kept = data.drop_duplicates([labelled(part) for part in parts])
    texts = [text for part in kept for text in part.texts]
    assert all(not same_text(a, b) for i, a in enumerate(texts) for b in texts[i + 1:]), "no text twice anywhere"
    everything = [text for part in parts for text in part]
    firsts = [text for i, text in enumerate(everything) if not any(same_text(text, b) for b in everything[:i])]
    assert texts == firsts
    for before, after in zip(parts, kept):  # each text keeps its label
        assert after.labels == [before.index(text) % 2 for text in after.texts]


def test_the_books_split_holds_the_issues_duplicates(sms_spam_file):
    """The issue's numbers are byte-exact copies; ours also count the copies that differ by a trailing space."""
    splits = data.load_splits(sms_spam_file, seed=123)
    train_texts = set(splits.train.texts)
    assert sum(text in train_texts for text in splits.test.texts) == 36
    assert sum(text in train_texts for text in splits.validation.texts) == 14
    assert len(set(splits.train.texts + splits.validation.texts + splits.test.texts)) == 1391
    seen = data.seen_in(splits.test.texts, splits.train.texts)
    assert sum(seen) == 38 and sum(s for s, y in zip(seen, splits.test.labels) if y == 1) == 36
    assert sum(data.seen_in(splits.validation.texts, splits.train.texts)) == 20


def test_dedup_on_the_sms_file_keeps_no_text_in_two_splits(sms_spam_file):
    splits = data.load_splits(sms_spam_file, seed=123, dedup=True)
    assert splits.dropped == 5574 - 5160
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (898, 128, 258)  # 642 spam, balanced
    keys = [data.duplicate_key(text) for part in (splits.train, splits.validation, splits.test) for text in part.texts]
    assert len(set(keys)) == len(keys)
    assert data.load_splits(sms_spam_file, seed=123).dropped == 0, "the book's split stays the default"


def test_dedup_with_separate_files_removes_their_texts_of_the_training_file(tmp_path):
    files = {"train": "ham\tok\nspam\tWIN now\nham\tok \n", "val": "ham\tok\nham\tlunch?\n",
             "test": "spam\tWIN now\nham\tbye\n"}
    for name, content in files.items():
        (tmp_path / f"{name}.txt").write_text(content, encoding="utf-8")
    splits = data.load_splits(tmp_path / "train.txt", balanced=False, validation_path=tmp_path / "val.txt",
                              test_path=tmp_path / "test.txt", dedup=True)
    assert (splits.train.texts, splits.validation.texts, splits.test.texts) == (["ok", "WIN now"], ["lunch?"], ["bye"])
    assert splits.dropped == 3
    (tmp_path / "test.txt").write_text("spam\tWIN now\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--dedup: every text of --test-data is also in an earlier file"):
        data.load_splits(tmp_path / "train.txt", balanced=False, validation_path=tmp_path / "val.txt",
                         test_path=tmp_path / "test.txt", dedup=True)


# --------------------------------------------------------------------------- class weights


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=1, max_size=40))
def test_class_weights_are_n_over_classes_times_count(labels):
    texts = labelled([str(i) for i in range(len(labels))])
    weights = data.class_weights(data.LabelledTexts(texts.texts, labels, ["a", "b", "c", "d"]))
    for k in range(4):
        count = labels.count(k)
        assert weights[k].item() == pytest.approx(len(labels) / (4 * count) if count else 0.0, rel=1e-6)
    for k in {*labels}:  # each class present carries the same total weight, n / K
        assert weights[k].item() * labels.count(k) == pytest.approx(len(labels) / 4, rel=1e-5)


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(st.integers(0, 2), min_size=1, max_size=12), seed=st.integers(0, 2**31),
       weights=st.lists(st.floats(0.1, 10), min_size=3, max_size=3))
def test_the_weighted_loss_is_the_weighted_mean_of_the_texts_cross_entropies(labels, seed, weights):
    logits = torch.randn(len(labels), 3, generator=torch.Generator().manual_seed(seed))  # (B, K)
    targets, class_weights = torch.tensor(labels), torch.tensor(weights)
    terms = [-torch.log_softmax(logits[i], dim=-1)[y].item() for i, y in enumerate(labels)]
    expected = sum(weights[y] * term for y, term in zip(labels, terms)) / sum(weights[y] for y in labels)
    assert train.supervised_loss(logits, targets, class_weights).item() == pytest.approx(expected, rel=1e-5)
    assert train.supervised_loss(logits, targets).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(st.integers(0, 1), min_size=1, max_size=9), world_size=st.integers(1, 4),
       seed=st.integers(0, 2**31))
def test_the_shares_weigh_each_process_so_the_batch_mean_is_one_process_mean(labels, world_size, seed):
    """distributed.shard's share, times each process's weighted mean over its texts, added up over
    the processes, is the whole batch's weighted mean (what DDP's hook does with the gradients)."""
    logits = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    class_weights = torch.tensor([0.6, 3.0], dtype=torch.float64)
    text_weights = class_weights[labels].tolist()
    whole = F.cross_entropy(logits, torch.tensor(labels), weight=class_weights).item()
    total = 0.0
    for rank in range(world_size):
        runtime = distributed.Runtime(torch.device("cpu"), rank, world_size)
        [(mine, size)] = list(distributed.shard([list(range(len(labels)))], runtime, text_weights))
        if mine:
            share_loss = F.cross_entropy(logits[mine], torch.tensor(labels)[mine], weight=class_weights)
            total += runtime.share * share_loss.item()
        else:
            assert runtime.share == 0
    assert total == pytest.approx(whole, rel=1e-9)


# --------------------------------------------------------------------------- baselines


def tokenized(train_texts: list[str], train_labels: list[int], test_texts: list[str], test_labels: list[int]
              ) -> data.TokenizedSplits:
    splits = data.Splits(labelled(train_texts, train_labels), labelled(test_texts, test_labels),
                         labelled(test_texts, test_labels))
    return data.tokenize(splits, None, 1024)


@settings(max_examples=30, deadline=None)
@given(train_labels=st.lists(st.integers(0, 1), min_size=1, max_size=15))
def test_the_majority_baseline_predicts_the_training_majority(train_labels):
    tokens = tokenized([f"text {i}" for i in range(len(train_labels))], train_labels, ["hi", "win"], [0, 1])
    run = evaluation.run_baseline("majority", tokens, ["ham", "spam"])
    majority = 1 if train_labels.count(1) > train_labels.count(0) else 0  # a tie: the first class
    assert run.test_predictions == [majority, majority]
    assert run.test_probabilities[0][1] == pytest.approx(train_labels.count(1) / len(train_labels), abs=1e-6)
    assert run.parameters["trainable"] == 2


SPAM = ["WIN a free prize now", "free entry, call now to win", "claim your cash prize, text WIN", "URGENT you won cash"]
HAM = ["see you at lunch", "ok, home soon", "can you call me later?", "lunch tomorrow at noon?"]


def test_bag_of_words_is_deterministic_and_learns_the_words():
    tokens = tokenized(SPAM + HAM, [1] * 4 + [0] * 4, ["free cash prize, call now", "home for lunch?"], [1, 0])
    first = evaluation.run_baseline("bag-of-words", tokens, ["ham", "spam"])
    second = evaluation.run_baseline("bag-of-words", tokens, ["ham", "spam"])
    assert (first.reports, first.losses, first.test_probabilities) == (second.reports, second.losses,
                                                                       second.test_probabilities)
    assert first.reports["train"].accuracy == 1.0 and first.test_predictions == [1, 0]
    assert first.parameters["trainable"] == 50257 * 2 + 2


def test_bag_of_words_is_the_l2_logistic_regression_optimum():
    """At the fit, the objective's gradient, counts^T (p - onehot(y)) w_y + W for the weights and
    the sum of the (p - onehot(y)) w_y for the bias, is zero (class weights w: here balanced)."""
    labels = [1] * 4 + [0] * 4 + [0, 0]
    train_data = data.ClassificationDataset([data.encode(data.get_tokenizer(), t) for t in SPAM + HAM + ["ok", "hi"]],
                                            labels)
    class_weights = data.class_weights(data.LabelledTexts(["x"] * len(labels), labels, ["ham", "spam"]))
    fit = evaluation.fit_baseline("bag-of-words", train_data, 2, class_weights)
    counts = evaluation.token_counts(train_data.token_ids).to_dense()  # (N, V)
    probabilities = torch.softmax(counts @ fit.weight + fit.bias, dim=-1)  # (N, K)
    residual = (probabilities - F.one_hot(torch.tensor(labels), 2)) * class_weights.double()[labels].unsqueeze(1)
    assert (counts.T @ residual + fit.weight).abs().max() < 1e-4
    assert residual.sum(dim=0).abs().max() < 1e-4


# --------------------------------------------------------------------------- the mistakes


HOSTILE = ["tab\there", "two\nlines", 'a "quote"', "cr\ronly", "\x1b[31mred\x1b[0m", "  spaces  ", "ok", "plain"]


def fake_run(texts: list[str], labels: list[int], predictions: list[int], probabilities: list[list[float]]):
    tokens = types.SimpleNamespace(texts=data.Splits(labelled(["ok"]), labelled(["x"]), labelled(texts, labels)))
    result = types.SimpleNamespace(test_labels=labels, test_predictions=predictions,
                                   test_probabilities=probabilities, reports={"test": types.SimpleNamespace(
                                       accuracy=metrics.accuracy(labels, predictions))})
    return result, tokens


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.sampled_from(HOSTILE) | st.text(max_size=8), min_size=1, max_size=8),
       data_=st.data())
def test_mistakes_tsv_lists_exactly_the_misclassified_texts_and_reads_back(texts, data_, tmp_path_factory):
    size = len(texts)
    labels = data_.draw(st.lists(st.integers(0, 1), min_size=size, max_size=size))
    predictions = data_.draw(st.lists(st.integers(0, 1), min_size=size, max_size=size))
    spam = data_.draw(st.lists(st.floats(0, 1), min_size=size, max_size=size))
    probabilities = [[1 - p, p] for p in spam]
    result, tokens = fake_run(texts, labels, predictions, probabilities)
    path = tmp_path_factory.mktemp("mistakes") / "mistakes.tsv"
    evaluation.write_mistakes(path, result, tokens)
    with path.open(encoding="utf-8", newline="") as file:
        header, *rows = list(csv.reader(file, dialect="excel-tab"))
    assert header == ["text", "true", "predicted", "p(ham)", "p(spam)", "in_training"]
    wrong = [i for i in range(size) if labels[i] != predictions[i]]
    expected = sorted(wrong, key=lambda i: -probabilities[i][predictions[i]])
    assert [row[0] for row in rows] == [texts[i] for i in expected], "exactly the mistakes, most confident first"
    for row, i in zip(rows, expected):
        assert row[1:3] == [["ham", "spam"][labels[i]], ["ham", "spam"][predictions[i]]]
        assert [float(p) for p in row[3:5]] == pytest.approx(probabilities[i], abs=1e-6)
        assert row[5] == ("yes" if data.duplicate_key(texts[i]) == "ok" else "no")


def test_the_log_shows_the_most_confident_mistakes_escaped_on_one_line_each():
    texts = ["\x1b[2Jclear\tscreen\nnow", "fine", "WIN " * 40, "ok"]
    result, tokens = fake_run(texts, [0, 0, 1, 0], [1, 0, 0, 1], [[0.1, 0.9], [0.8, 0.2], [0.97, 0.03], [0.4, 0.6]])
    assert evaluation.describe_unseen(result, tokens) == " (33.33% on the 3 not seen in training)"
    lines = evaluation.describe_mistakes(result, tokens).split("\n")
    assert lines[0] == "the 3 most confident of 3 test mistakes (all in mistakes.tsv):"
    assert lines[1].startswith("  spam taken for ham (p(ham) 0.970): WIN WIN") and lines[1].endswith("…")
    assert lines[2] == "  ham taken for spam (p(spam) 0.900): \\x1b[2Jclear screen now"
    assert lines[3] == "  ham taken for spam (p(spam) 0.600): ok" and len(lines) == 4
    assert all(len(line) < 120 for line in lines)


# --------------------------------------------------------------------------- in the pipeline


@pytest.fixture(scope="module")
def repeated(workspace: Path) -> Path:
    """The SMS slice with 30 of its spam lines written twice more: duplicates across the splits."""
    lines = (workspace / "sms.txt").read_text(encoding="utf-8").splitlines()
    spam = [line for line in lines if line.startswith("spam")][:30]
    path = workspace / "repeated.txt"
    path.write_text("\n".join(lines + spam + [line + " " for line in spam]) + "\n", encoding="utf-8")
    return path


def baseline_args(workspace: Path, repeated: Path, *extra: str) -> list[str]:
    args = tiny_args(workspace, "--out", "run", "--compare", "majority,bag-of-words,last-block", *extra)
    args[args.index("--data") + 1] = str(repeated)
    return args


@pytest.fixture(scope="module")
def compared(workspace: Path, repeated: Path) -> tuple[Path, str]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder = workspace / "baselines"
        folder.mkdir()
        monkeypatch.chdir(folder)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert train.main(baseline_args(workspace, repeated)) == 0
    return folder / "run", stdout.getvalue()


def test_baselines_are_rows_of_the_comparison_like_a_strategy(compared):
    run_dir, stdout = compared
    rows = json.loads((run_dir / "compare.json").read_text())["rows"]
    assert [row["strategy"] for row in rows] == ["majority", "bag-of-words", "last-block"]
    assert all(set(row) - {"vs_reference"} == set(rows[2]) for row in rows), "a strategy's keys (the reference's)"
    assert all(set(row["runs"][0]) == set(rows[2]["runs"][0]) for row in rows)
    assert [row["vs_reference"]["reference"] for row in rows[:2]] == ["last-block", "last-block"]
    assert rows[0]["trainable_parameters"] == 2 and rows[1]["trainable_parameters"] == 50257 * 2 + 2
    for name in ("majority", "bag-of-words"):
        assert sorted(p.name for p in (run_dir / name).iterdir()) == ["metrics.json", "mistakes.tsv"]
        document, strategy = load_metrics(run_dir / name), load_metrics(run_dir / "last-block")
        assert set(document) == set(strategy) | {"baseline"} and "classify.py" in document["baseline"]["classifier"]
        assert f"\nbaseline {name}: " in stdout
    table = stdout[stdout.index("strategy  "):]
    assert "\nmajority " in table and "\nbag-of-words " in table
    assert "\ntry it: python classify.py --model run/last-block " in stdout  # the one classify.py loads (--out run)


def test_the_end_of_a_comparison_suggests_the_best_classifier_never_a_baseline(tmp_path):
    out = tmp_path / "run"
    end = report.describe_end(out, [out / "last-block", out / "bag-of-words"], None, out / "last-block", "Hi", 9.0)
    assert end.splitlines()[-2:] == ["the best validation accuracy: last-block",
                                     f"try it: python classify.py --model {out / 'last-block'} Hi"]
    only_baselines = report.describe_end(out, [out / "majority"], None, None, "Hi", 9.0)
    assert "try it" not in only_baselines and only_baselines.endswith("total time 9.0 s")


def test_every_run_counts_the_duplicates_and_scores_the_unseen_test_texts(compared, workspace, repeated):
    run_dir, stdout = compared
    splits = data.load_splits(repeated, seed=123)
    seen = data.seen_in(splits.test.texts, splits.train.texts)
    in_validation = sum(data.seen_in(splits.validation.texts, splits.train.texts))
    assert 0 < sum(seen) < len(seen)
    assert (f"{sum(seen)} of {len(seen)} test texts also appear in the training data, and {in_validation} of "
            f"{len(splits.validation)} validation texts") in stdout
    document = load_metrics(run_dir / "bag-of-words")
    assert document["duplicates"]["test_in_training"] == sum(seen)
    assert document["duplicates"]["validation_in_training"] == in_validation
    tokens = data.tokenize(splits, None, 128)
    predictions = evaluation.run_baseline("bag-of-words", tokens, splits.label_names).test_predictions  # deterministic
    unseen = [i for i, known in enumerate(seen) if not known]
    expected = metrics.classification_report([splits.test.labels[i] for i in unseen],
                                             [predictions[i] for i in unseen], splits.label_names)
    assert document["test_unseen"] == json.loads(json.dumps(expected.to_dict()))
    assert stdout.count(" not seen in training)") == 3


def test_mistakes_tsv_of_a_run_holds_its_misclassified_test_texts(compared):
    run_dir, _ = compared
    for name in ("majority", "bag-of-words", "last-block"):
        matrix = load_metrics(run_dir / name)["test"]["confusion_matrix"]
        with (run_dir / name / "mistakes.tsv").open(encoding="utf-8", newline="") as file:
            rows = list(csv.reader(file, dialect="excel-tab"))[1:]
        assert len(rows) == matrix["ham"]["spam"] + matrix["spam"]["ham"]
        assert all(row[1] != row[2] for row in rows)


def test_dedup_leaves_nothing_seen_and_the_unseen_metrics_are_the_test_metrics(workspace, repeated, monkeypatch,
                                                                               capsys):
    code, stdout, stderr = run_in(workspace / "dedup", baseline_args(workspace, repeated, "--dedup"), monkeypatch,
                                  capsys)
    assert code == 0, stderr
    document = load_metrics(workspace / "dedup" / "run" / "last-block")
    assert document["duplicates"]["dropped_by_dedup"] >= 60 and document["duplicates"]["dedup"]
    assert document["duplicates"]["test_in_training"] == document["duplicates"]["validation_in_training"] == 0
    assert document["test_unseen"] == {key: value for key, value in document["test"].items() if key != "loss"}
    assert "--dedup dropped" in stdout


@pytest.mark.parametrize(("extra", "message"), [
    (["--strategy", "bag-of-words"], "--compare bag-of-words,last-block"),
    (["--compare", "majority,bag-of-words"], "baselines alone"),
])
def test_a_baseline_alone_is_refused_in_one_line(extra, message, workspace, monkeypatch, capsys):
    code, _, stderr = run_in(workspace / "refused", tiny_args(workspace, "--out", "run", *extra), monkeypatch, capsys)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr
    assert not (workspace / "refused" / "run").exists()


def test_class_weights_other_than_none_or_balanced_are_refused_before_any_work():
    with pytest.raises(ValueError, match="--class-weights inverse: must be none or balanced"):
        runner.check_config(train.TrainConfig(class_weights="inverse"))
