"""metrics.py: every metric equals its textbook definition, counted by hand in plain Python."""

import json
import math
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metrics
from metrics import (
    accuracy,
    classification_report,
    confusion_matrix,
    f1_score,
    format_report,
    precision,
    recall,
)

SCORES = {"precision": precision, "recall": recall, "f1": f1_score}
FAST = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------- the textbook, by counting


def count(y_true, y_pred, k):
    """TP, FP, FN of class k by walking the examples one by one."""
    tp = sum(1 for t, p in zip(y_true, y_pred) if t == k and p == k)
    fp = sum(1 for t, p in zip(y_true, y_pred) if t != k and p == k)
    fn = sum(1 for t, p in zip(y_true, y_pred) if t == k and p != k)
    return tp, fp, fn


def ratio(num, den):
    return num / den if den else 0.0


def textbook(y_true, y_pred, num_classes):
    """Per-class precision, recall, F1 and support from their definitions (zero_division = 0)."""
    per_class = {"precision": [], "recall": [], "f1": [], "support": []}
    for k in range(num_classes):
        tp, fp, fn = count(y_true, y_pred, k)
        p, r = ratio(tp, tp + fp), ratio(tp, tp + fn)
        per_class["precision"].append(p)
        per_class["recall"].append(r)
        per_class["f1"].append(ratio(2 * p * r, p + r))  # the harmonic mean, as the chapter writes it
        per_class["support"].append(tp + fn)
    return per_class


def textbook_average(y_true, y_pred, num_classes, metric, average):
    per_class = textbook(y_true, y_pred, num_classes)
    scores, support = per_class[metric], per_class["support"]
    if average == "macro":
        return sum(scores) / num_classes
    if average == "weighted":
        return sum(s * n for s, n in zip(scores, support)) / len(y_true)
    # micro: pool the counts of every class, then apply the definition once
    tp = fp = fn = 0
    for k in range(num_classes):
        c_tp, c_fp, c_fn = count(y_true, y_pred, k)
        tp, fp, fn = tp + c_tp, fp + c_fp, fn + c_fn
    p, r = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {"precision": p, "recall": r, "f1": ratio(2 * p * r, p + r)}[metric]


@st.composite
def labelled(draw, min_size=1):
    """(y_true, y_pred, K): random labels where some classes may never occur or never be predicted."""
    num_classes = draw(st.integers(1, 6))
    true_classes = draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=num_classes, unique=True))
    pred_classes = draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=num_classes, unique=True))
    n = draw(st.integers(min_size, 40))
    y_true = draw(st.lists(st.sampled_from(true_classes), min_size=n, max_size=n))
    y_pred = draw(st.lists(st.sampled_from(pred_classes), min_size=n, max_size=n))
    return y_true, y_pred, num_classes


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


# --------------------------------------------------------------------------- definitions


@FAST
@given(labelled(min_size=0))
def test_confusion_matrix_cell_ij_counts_true_i_predicted_j(data):
    y_true, y_pred, k = data
    cm = confusion_matrix(y_true, y_pred, k)
    assert cm.dtype == torch.int64 and cm.shape == (k, k)
    for i in range(k):
        for j in range(k):
            assert cm[i, j] == sum(1 for t, p in zip(y_true, y_pred) if t == i and p == j)


@FAST
@given(labelled())
def test_every_metric_equals_its_textbook_definition(data):
    y_true, y_pred, k = data
    reference = textbook(y_true, y_pred, k)
    assert accuracy(y_true, y_pred) == sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)
    for name, metric in SCORES.items():
        per_class = metric(y_true, y_pred, k, average=None)
        assert per_class.shape == (k,)
        assert all(close(ours, ref) for ours, ref in zip(per_class.tolist(), reference[name])), name
        for average in ("macro", "micro", "weighted"):
            ours = metric(y_true, y_pred, k, average=average)
            assert isinstance(ours, float)
            assert close(ours, textbook_average(y_true, y_pred, k, name, average)), (name, average)
        for pos_label in range(k):
            ours = metric(y_true, y_pred, k, average="binary", pos_label=pos_label)
            assert close(ours, reference[name][pos_label]), (name, pos_label)
        assert metric(y_true, y_pred, k) == metric(y_true, y_pred, k, pos_label=k - 1)  # default: last class


def test_accuracy_misleads_on_unbalanced_data():
    # The chapter's warning: always answering "ham" looks good and catches no spam.
    y_true = [0] * 95 + [1] * 5
    always_ham = [0] * 100
    assert accuracy(y_true, always_ham) == 0.95
    assert precision(y_true, always_ham, 2) == 0.0  # zero predicted spam: 0/0 -> 0.0
    assert recall(y_true, always_ham, 2) == 0.0
    assert f1_score(y_true, always_ham, 2) == 0.0
    assert confusion_matrix(y_true, always_ham, 2).tolist() == [[95, 0], [5, 0]]


def test_zero_division_gives_zero_without_nan_or_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = precision([2, 2], [2, 2], 4, average=None)  # classes 0, 1, 3 never predicted
        assert scores.tolist() == [0.0, 0.0, 1.0, 0.0]
        assert not torch.isnan(f1_score([0, 0], [1, 1], 3, average=None)).any()
        assert recall([0], [1], 3, average="macro") == 0.0


# --------------------------------------------------------------------------- invariants


@FAST
@given(labelled(min_size=0))
def test_matrix_sums_to_number_of_examples(data):
    y_true, y_pred, k = data
    cm = confusion_matrix(y_true, y_pred, k)
    assert int(cm.sum()) == len(y_true)
    assert cm.sum(dim=1).tolist() == [y_true.count(c) for c in range(k)]  # rows: support
    assert cm.sum(dim=0).tolist() == [y_pred.count(c) for c in range(k)]  # columns: predictions


@FAST
@given(labelled())
def test_trace_over_n_is_accuracy_and_micro_scores_are_accuracy(data):
    y_true, y_pred, k = data
    acc = accuracy(y_true, y_pred)
    assert close(int(confusion_matrix(y_true, y_pred, k).trace()) / len(y_true), acc)
    for metric in SCORES.values():
        assert close(metric(y_true, y_pred, k, average="micro"), acc)
    assert close(classification_report(y_true, y_pred, [str(c) for c in range(k)]).accuracy, acc)


@FAST
@given(labelled())
def test_f1_is_the_harmonic_mean_of_precision_and_recall(data):
    y_true, y_pred, k = data
    p = precision(y_true, y_pred, k, average=None).tolist()
    r = recall(y_true, y_pred, k, average=None).tolist()
    f = f1_score(y_true, y_pred, k, average=None).tolist()
    for p_k, r_k, f_k in zip(p, r, f):
        assert close(f_k, 2 * p_k * r_k / (p_k + r_k) if p_k + r_k else 0.0)
        assert min(p_k, r_k) - 1e-12 <= f_k <= max(p_k, r_k) + 1e-12


@FAST
@given(st.integers(1, 6), st.data())
def test_perfect_predictions_score_one_everywhere(k, data):
    y_true = data.draw(st.permutations(list(range(k)) * data.draw(st.integers(1, 4))))  # every class present
    for metric in SCORES.values():
        assert metric(y_true, y_true, k, average=None).tolist() == [1.0] * k
        for average in ("binary", "macro", "micro", "weighted"):
            assert metric(y_true, y_true, k, average=average) == 1.0
    assert accuracy(y_true, y_true) == 1.0
    cm = confusion_matrix(y_true, y_true, k)
    assert torch.equal(cm, torch.diag(cm.diagonal()))  # nothing off the diagonal


@FAST
@given(labelled(), st.randoms(use_true_random=False))
def test_permuting_the_examples_changes_nothing(data, rng):
    y_true, y_pred, k = data
    order = list(range(len(y_true)))
    rng.shuffle(order)
    shuffled_true, shuffled_pred = [y_true[i] for i in order], [y_pred[i] for i in order]
    assert torch.equal(confusion_matrix(y_true, y_pred, k), confusion_matrix(shuffled_true, shuffled_pred, k))
    assert accuracy(y_true, y_pred) == accuracy(shuffled_true, shuffled_pred)
    for metric in SCORES.values():
        for average in ("macro", "micro", "weighted", "binary"):
            assert metric(y_true, y_pred, k, average=average) == metric(shuffled_true, shuffled_pred, k, average=average)


@FAST
@given(labelled(), st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))
def test_tensors_and_lists_give_the_same_numbers(data, dtype):
    y_true, y_pred, k = data
    t_true, t_pred = torch.tensor(y_true, dtype=dtype), torch.tensor(y_pred, dtype=dtype)
    assert torch.equal(confusion_matrix(t_true, t_pred, k), confusion_matrix(y_true, y_pred, k))
    assert torch.equal(confusion_matrix(t_true, y_pred, k), confusion_matrix(y_true, t_pred, k))  # mixed
    assert accuracy(t_true, t_pred) == accuracy(y_true, y_pred)
    for metric in SCORES.values():
        assert torch.equal(metric(t_true, t_pred, k, average=None), metric(y_true, y_pred, k, average=None))
        assert metric(t_true, t_pred, k, average="macro") == metric(y_true, y_pred, k, average="macro")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_labels_on_the_gpu_give_the_same_numbers():
    rng = random.Random(0)
    y_true = [rng.randrange(3) for _ in range(500)]
    y_pred = [rng.randrange(3) for _ in range(500)]
    on_gpu = torch.tensor(y_true, device="cuda"), torch.tensor(y_pred, device="cuda")
    cm = confusion_matrix(*on_gpu, 3)
    assert cm.device.type == "cuda"
    assert cm.cpu().tolist() == confusion_matrix(y_true, y_pred, 3).tolist()
    assert confusion_matrix(y_true, on_gpu[1], 3).device.type == "cuda"  # a list joins the tensor's device
    assert f1_score(*on_gpu, 3, average="macro") == f1_score(y_true, y_pred, 3, average="macro")
    assert classification_report(*on_gpu, ["a", "b", "c"]) == classification_report(y_true, y_pred, ["a", "b", "c"])


# --------------------------------------------------------------------------- bad input teaches


@pytest.mark.parametrize(
    "y_true, y_pred, match",
    [
        ([0, 1, 1], [0, 1], "3 labels but y_pred has 2"),
        ([0, 2], [0, 1], r"y_true\[1\] = 2 is outside \[0, 2\)"),
        ([0, 1], [0, -1], r"y_pred\[1\] = -1 is outside"),
        ([0.0, 1.0], [0, 1], "must be int"),
        ([True, False], [0, 1], "must be int"),
        ([0, 1], ["0", "1"], "must be int"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "dtype torch.float32.*argmax"),
        (torch.tensor([True, False]), torch.tensor([0, 1]), "dtype torch.bool"),
        (torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), r"shape \(1, 2\)"),
        ("01", [0, 1], "list of ints"),
    ],
)
def test_bad_labels_raise_value_error(y_true, y_pred, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(y_true, y_pred, 2)
    for metric in SCORES.values():
        with pytest.raises(ValueError):
            metric(y_true, y_pred, 2, average="macro")
    with pytest.raises(ValueError):
        classification_report(y_true, y_pred, ["ham", "spam"])


def test_accuracy_checks_its_labels_too():
    with pytest.raises(ValueError, match="must be int"):
        accuracy([0.5, 1], [0, 1])
    with pytest.raises(ValueError, match="outside"):
        accuracy([0, -3], [0, 1])
    with pytest.raises(ValueError, match="outside"):
        accuracy([0, 2], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="labels but"):
        accuracy([0], [0, 1])


def test_empty_input_is_undefined_for_scores_but_not_for_the_matrix():
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]
    assert confusion_matrix(torch.tensor([], dtype=torch.long), [], 3).sum() == 0
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    for metric in SCORES.values():
        for average in metrics.AVERAGES:
            with pytest.raises(ValueError, match="empty"):
                metric([], [], 2, average=average)
    with pytest.raises(ValueError, match="empty"):
        classification_report([], [], ["ham", "spam"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.0}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"num_classes": 2, "average": "samples"}, "average='samples'"),
        ({"num_classes": 2, "pos_label": 2}, "pos_label=2"),
        ({"num_classes": 2, "pos_label": -1}, "pos_label=-1"),
        ({"num_classes": 2, "pos_label": "spam"}, "pos_label='spam'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    for metric in SCORES.values():
        with pytest.raises(ValueError, match=match):
            metric([0, 1], [0, 1], **kwargs)


@pytest.mark.parametrize("names", [[], ["ham", "ham"], ["ham", 1], "hs"])
def test_report_rejects_bad_label_names(names):
    with pytest.raises(ValueError, match="label_names"):
        classification_report([0, 1], [0, 1], names)


# --------------------------------------------------------------------------- the report


@FAST
@given(labelled())
def test_report_agrees_with_the_functions_and_is_json(data):
    y_true, y_pred, k = data
    names = [f"class {c}" for c in range(k)]
    report = classification_report(y_true, y_pred, names)
    for name, metric in SCORES.items():
        assert getattr(report, name) == metric(y_true, y_pred, k, average=None).tolist()
        assert getattr(report, f"macro_{name}") == metric(y_true, y_pred, k, average="macro")
        assert getattr(report, f"weighted_{name}") == metric(y_true, y_pred, k, average="weighted")
    assert report.support == textbook(y_true, y_pred, k)["support"]
    assert report.confusion_matrix == confusion_matrix(y_true, y_pred, k).tolist()
    assert report.accuracy == accuracy(y_true, y_pred)

    as_dict = json.loads(json.dumps(report.to_dict()))  # survives a JSON round trip unchanged
    assert as_dict == report.to_dict()
    assert as_dict["accuracy"] == report.accuracy and as_dict["num_samples"] == len(y_true)
    for c, name in enumerate(names):
        assert as_dict["per_class"][name] == {
            "precision": report.precision[c],
            "recall": report.recall[c],
            "f1": report.f1[c],
            "support": report.support[c],
        }
        for j, predicted_name in enumerate(names):
            assert as_dict["confusion_matrix"][name][predicted_name] == report.confusion_matrix[c][j]
    assert as_dict["macro_avg"]["f1"] == report.macro_f1
    assert as_dict["weighted_avg"]["recall"] == report.weighted_recall


def test_format_report_shows_every_number_in_aligned_columns():
    y_true = [0] * 9 + [1] * 3
    y_pred = [0] * 6 + [1] * 3 + [1, 1, 0]
    report = classification_report(y_true, y_pred, ["ham", "spam"])
    text = format_report(report)
    lines = text.splitlines()
    expected = {  # precision, recall, f1 worked out by hand from the matrix [[6, 3], [1, 2]]
        "ham": ("0.8571", "0.6667", "0.7500", "9"),  # 6/7, 6/9, 12/16
        "spam": ("0.4000", "0.6667", "0.5000", "3"),  # 2/5, 2/3, 4/8
        "macro avg": ("0.6286", "0.6667", "0.6250", "12"),
        "weighted avg": ("0.7429", "0.6667", "0.6875", "12"),  # (9 * ham + 3 * spam) / 12
    }
    for name, numbers in expected.items():
        row = next(line for line in lines if line.strip().startswith(name + " "))
        assert row.split()[-4:] == list(numbers)
    accuracy_row = next(line for line in lines if line.strip().startswith("accuracy"))
    assert accuracy_row.split() == ["accuracy", "0.6667", "12"]
    matrix_title = lines.index("confusion matrix (rows: true class, columns: predicted class)")
    score_rows = [line for line in lines[:matrix_title] if line.strip()]
    assert len({len(line) for line in score_rows}) == 1  # every row as wide as the header
    assert all(line == line.rstrip() for line in score_rows)  # right-aligned: nothing trails
    header = score_rows[0]
    for row in score_rows[1:]:  # numbers end under the end of their column title
        for title in ("precision", "recall", "f1-score", "support"):
            end = header.index(title) + len(title)
            assert row[end - 1] != " " or row.strip().startswith("accuracy")

    matrix_lines = lines[matrix_title + 2 :]
    assert matrix_lines[0].split()[-2:] == ["ham", "spam"]
    assert matrix_lines[1].split() == ["ham", "6", "3"]
    assert matrix_lines[2].split() == ["spam", "1", "2"]
    assert len({len(line) for line in matrix_lines}) == 1
    assert all(line == line.rstrip() for line in matrix_lines)  # counts end under their class name


def test_format_report_in_percent_gives_the_same_numbers_times_100():
    report = classification_report([0] * 9 + [1] * 3, [0] * 6 + [1] * 3 + [1, 1, 0], ["ham", "spam"])
    rows = dict(zip(("fraction", "percent"), (format_report(report), format_report(report, 2, percent=True))))
    ham = {kind: next(line for line in text.splitlines() if line.strip().startswith("ham ")).split()
           for kind, text in rows.items()}
    assert ham["percent"] == ["ham", "85.71%", "66.67%", "75.00%", "9"]
    for fraction, percent in zip(ham["fraction"][1:4], ham["percent"][1:4]):
        assert float(percent[:-1]) == pytest.approx(100 * float(fraction), abs=0.01)


def test_format_report_widens_columns_for_long_names_and_digits():
    names = ["a", "a much longer class name", "c"]
    report = classification_report([0, 1, 2, 1], [0, 1, 1, 1], names)
    text = format_report(report, digits=2)
    assert "0.67" in text and "0.6667" not in text
    matrix_lines = text.splitlines()[-4:]
    assert len({len(line) for line in matrix_lines}) == 1
    assert matrix_lines[2].split()[-3:] == ["0", "2", "0"]  # the long-named class row


# --------------------------------------------------------------------------- McNemar's exact test


def brute_force_mcnemar(b: int, c: int) -> float:
    """Every one of the 2^n ways n = b + c disagreements could fall if A and B were equally good
    (each text a fair coin: A's win or B's), counted one by one: the share of them at least as
    lopsided as (b, c), either way."""
    n, observed = b + c, min(b, c)
    lopsided = sum(1 for outcome in range(2**n) if min(bin(outcome).count("1"), n - bin(outcome).count("1")) <= observed)
    return lopsided / 2**n


small_counts = st.tuples(st.integers(0, 7), st.integers(0, 7))


@FAST
@given(counts=small_counts)
def test_mcnemar_exact_equals_counting_every_outcome(counts):
    assert metrics.mcnemar_exact(*counts) == brute_force_mcnemar(*counts)  # to the last bit


@FAST
@given(b=st.integers(0, 400), c=st.integers(0, 400))
def test_mcnemar_exact_is_symmetric_and_a_probability(b, c):
    p = metrics.mcnemar_exact(b, c)
    assert p == metrics.mcnemar_exact(c, b)  # which classifier is called A does not matter
    assert 0.0 <= p <= 1.0 and (p > 0 or b + c > 1000)  # only astronomically lopsided splits reach 0.0
    if b == c:
        assert p == 1.0  # a perfectly even split is no evidence at all


@FAST
@given(b=st.integers(0, 200), c=st.integers(0, 200))
def test_mcnemar_exact_falls_as_the_split_grows_more_lopsided(b, c):
    """One more text won by the side that already wins more never makes the difference less
    significant; one more text won by the losing side never makes it more significant."""
    low, high = min(b, c), max(b, c)
    assert metrics.mcnemar_exact(low, high + 1) <= metrics.mcnemar_exact(low, high)
    if low < high:
        assert metrics.mcnemar_exact(low + 1, high) >= metrics.mcnemar_exact(low, high)


def test_mcnemar_exact_known_values_and_large_counts():
    assert metrics.mcnemar_exact(0, 0) == 1.0  # they never disagree
    assert metrics.mcnemar_exact(1, 9) == 22 / 1024  # 2 * (C(10,0) + C(10,1)) / 2^10
    assert metrics.mcnemar_exact(0, 5) == 2 / 32 and metrics.mcnemar_exact(0, 6) == 2 / 64
    assert metrics.mcnemar_exact(2, 3) == 1.0
    p = metrics.mcnemar_exact(900, 1100)  # 2,000 disagreements: no overflow, no underflow
    assert 1e-6 < p < 1e-4
    assert metrics.mcnemar_exact(0, 3000) == 0.0  # 2 / 2^3000 is below the smallest float
    assert metrics.mcnemar_exact(1500, 1500) == 1.0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_mcnemar_exact_wants_counts(bad):
    with pytest.raises(ValueError, match="discordant counts"):
        metrics.mcnemar_exact(bad, 3)


@FAST
@given(data=st.data())
def test_discordant_counts_are_the_texts_one_gets_right_and_the_other_wrong(data):
    size = data.draw(st.integers(0, 30))
    labels = st.lists(st.integers(0, 2), min_size=size, max_size=size)
    y_true, pred_a, pred_b = data.draw(labels), data.draw(labels), data.draw(labels)
    b, c = metrics.discordant_counts(y_true, pred_a, pred_b)
    assert b == sum(1 for t, a, p in zip(y_true, pred_a, pred_b) if a == t and p != t)
    assert c == sum(1 for t, a, p in zip(y_true, pred_a, pred_b) if a != t and p == t)
    right_a = sum(a == t for t, a in zip(y_true, pred_a))
    right_b = sum(p == t for t, p in zip(y_true, pred_b))
    assert b - c == right_a - right_b  # the accuracy difference lives in the discordant texts alone
    assert metrics.discordant_counts(y_true, pred_b, pred_a) == (c, b)


def test_discordant_counts_check_their_input():
    with pytest.raises(ValueError, match="3 labels but y_pred has 2"):
        metrics.discordant_counts([0, 1, 1], [0, 1, 1], [0, 1])
    assert metrics.discordant_counts(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 1]), [1, 1, 1, 1]) == (1, 1)
