"""Classification metrics written by hand: the confusion matrix, precision, recall, F1 and accuracy.

The chapter's section "Avaliando classificadores de texto" ("Accuracy", "Precision", "Recall",
"F1-score", "Confusion Matrix"). Accuracy alone misleads on unbalanced data: on a test set with
95% ham, a model that answers "ham" to every message scores 95% accuracy and catches no spam.
Precision, recall and F1 per class, and the confusion matrix, show how the model errs.

Everything is read from one table, the confusion matrix: rows are true classes, columns are
predicted classes. For class k:

    TP = cell (k, k)              predicted k, and it was k
    FP = column k minus TP        predicted k, but it was something else
    FN = row k minus TP           it was k, but predicted something else
    precision = TP / (TP + FP)    of what we called k, how much was k
    recall    = TP / (TP + FN)    of what was k, how much we found
    F1        = 2 TP / (2 TP + FP + FN), the harmonic mean of precision and recall

A zero denominator gives 0.0 (scikit-learn's `zero_division=0`), never NaN and never a warning.
Names and averages (`binary`, `macro`, `micro`, `weighted`) follow scikit-learn, so the calls look
familiar, but the file needs torch and the standard library only and can be copied on its own.
Evaluation step of the pipeline, after step 7 (weight update): how good is the classifier?

Two classifiers scored on the same test texts are compared text by text: `mcnemar_exact` says
whether the texts one gets right and the other wrong are too lopsided to be chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

AVERAGES = ("binary", "macro", "micro", "weighted", None)

Labels = torch.Tensor | Sequence[int]


# --------------------------------------------------------------------------- the confusion matrix


def confusion_matrix(y_true: Labels, y_pred: Labels, num_classes: int) -> torch.Tensor:
    """Count of examples of true class i predicted as class j, in cell (i, j).

    Rows are true classes, columns predicted classes; the diagonal holds the right answers.
    Returns a (K, K) int64 tensor on the labels' device (all zeros for empty input).
    """
    true, pred = _label_pair(y_true, y_pred, num_classes)
    # Pair (i, j) becomes the single index i * K + j, so one bincount counts every cell at once.
    cell = true * num_classes + pred  # (N,)
    counts = torch.bincount(cell, minlength=num_classes * num_classes)  # (K * K,)
    return counts.reshape(num_classes, num_classes)  # (K, K)


def count_outcomes(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every class's true positives, false positives and false negatives, read off the matrix.

    In float64 on the CPU: K x K counts are cheap to move, and float64 keeps the scores exact to
    the last digit (MPS has no float64).
    """
    cm = cm.cpu().double()  # (K, K)
    true_positives = cm.diagonal()  # (K,)
    false_positives = cm.sum(dim=0) - true_positives  # (K,) the rest of column k
    false_negatives = cm.sum(dim=1) - true_positives  # (K,) the rest of row k
    return true_positives, false_positives, false_negatives


# --------------------------------------------------------------------------- precision, recall, F1


def precision(y_true: Labels, y_pred: Labels, num_classes: int, average: str | None = "binary",
              pos_label: int | None = None) -> float | torch.Tensor:
    """TP / (TP + FP): of the examples predicted as a class, the fraction that belong to it.

    average: "binary" scores pos_label (default the last class) against the rest; "macro" is the
    plain mean over classes; "micro" pools the counts of all classes first (equals accuracy);
    "weighted" weights each class by its support; None returns the (K,) float64 per-class scores.
    """
    true_positives, false_positives, false_negatives = _counts(y_true, y_pred, num_classes, average, pos_label)
    scores = _divide(true_positives, true_positives + false_positives)  # (K,), or () pooled by "micro"
    return _average(scores, true_positives + false_negatives, average, pos_label)


def recall(y_true: Labels, y_pred: Labels, num_classes: int, average: str | None = "binary",
           pos_label: int | None = None) -> float | torch.Tensor:
    """TP / (TP + FN): of the examples of a class, the fraction the model found.

    Arguments as `precision`.
    """
    true_positives, false_positives, false_negatives = _counts(y_true, y_pred, num_classes, average, pos_label)
    scores = _divide(true_positives, true_positives + false_negatives)  # (K,), or () pooled by "micro"
    return _average(scores, true_positives + false_negatives, average, pos_label)


def f1_score(y_true: Labels, y_pred: Labels, num_classes: int, average: str | None = "binary",
             pos_label: int | None = None) -> float | torch.Tensor:
    """Harmonic mean of precision P and recall R, 2PR / (P + R): high only when both are.

    Written with the counts, 2 TP / (2 TP + FP + FN), it needs one division instead of three.
    Arguments as `precision`; "macro" averages the per-class F1 scores (as scikit-learn does).
    """
    true_positives, false_positives, false_negatives = _counts(y_true, y_pred, num_classes, average, pos_label)
    scores = _divide(2 * true_positives, 2 * true_positives + false_positives + false_negatives)  # (K,) or ()
    return _average(scores, true_positives + false_negatives, average, pos_label)


def accuracy(y_true: Labels, y_pred: Labels, num_classes: int | None = None) -> float:
    """Fraction of right predictions.

    The right predictions are exactly the diagonal of the confusion matrix, so this is
    trace(cm) / N; counting matches directly needs no num_classes. When num_classes is given
    the labels are also checked against it.
    """
    true, pred = _label_pair(y_true, y_pred, num_classes)
    _check_not_empty(len(true))
    return int((true == pred).sum()) / len(true)


# --------------------------------------------------------------------------- one number from K classes


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, with 0.0 where the denominator is 0 (no NaN, no warning)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.zeros_like(numerator))


def _counts(y_true: Labels, y_pred: Labels, num_classes: int, average: str | None,
            pos_label: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TP, FP and FN per class, (K,) each; summed over the classes for average="micro", which
    scores the pooled counts once. With one label per example every mistake is one FP (of the
    predicted class) and one FN (of the true class), so micro precision = recall = F1 = accuracy."""
    _check_arguments(num_classes, average, pos_label)
    cm = confusion_matrix(y_true, y_pred, num_classes)  # (K, K)
    _check_not_empty(int(cm.sum()))
    counts = count_outcomes(cm)
    return tuple(count.sum() for count in counts) if average == "micro" else counts


def _average(scores: torch.Tensor, support: torch.Tensor, average: str | None,
             pos_label: int | None) -> float | torch.Tensor:
    """The per-class scores (K,) as asked: all of them, one class's, or an average; support (K,)
    counts each class's examples (TP + FN)."""
    if average is None:
        return scores
    if average == "micro":
        return float(scores)  # the counts were pooled before dividing
    if average == "binary":  # the positive class against all the others; default the last ("spam")
        return float(scores[len(scores) - 1 if pos_label is None else pos_label])
    if average == "macro":
        return float(scores.mean())  # every class counts the same, however rare
    return float((scores * support).sum() / support.sum())  # weighted by support


# --------------------------------------------------------------------------- the report


@dataclass
class ClassificationReport:
    """Every number of the evaluation, per class in the order of label_names."""

    label_names: list[str]
    accuracy: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    confusion_matrix: list[list[int]]  # rows true class, columns predicted class

    @property
    def num_samples(self) -> int:
        return sum(self.support)

    def to_dict(self) -> dict:
        """JSON-ready: per-class scores keyed by class name, confusion_matrix[true][predicted]."""
        fields = asdict(self)
        names = fields["label_names"]
        return {
            "accuracy": fields["accuracy"],
            "num_samples": self.num_samples,
            "per_class": {
                name: {
                    "precision": fields["precision"][k],
                    "recall": fields["recall"][k],
                    "f1": fields["f1"][k],
                    "support": fields["support"][k],
                }
                for k, name in enumerate(names)
            },
            "macro_avg": {
                "precision": fields["macro_precision"],
                "recall": fields["macro_recall"],
                "f1": fields["macro_f1"],
            },
            "weighted_avg": {
                "precision": fields["weighted_precision"],
                "recall": fields["weighted_recall"],
                "f1": fields["weighted_f1"],
            },
            "confusion_matrix": {
                true_name: dict(zip(names, row)) for true_name, row in zip(names, fields["confusion_matrix"])
            },
        }


def classification_report(y_true: Labels, y_pred: Labels, label_names: Sequence[str]) -> ClassificationReport:
    """All the chapter's metrics at once; label_names[k] names class index k."""
    names = [] if isinstance(label_names, str) else list(label_names)  # "ham" is not ["h", "a", "m"]
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"label_names must be a non-empty list of str, got {label_names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"label_names has duplicates: {names}; each class needs its own name")
    num_classes = len(names)
    cm = confusion_matrix(y_true, y_pred, num_classes)  # (K, K)
    _check_not_empty(int(cm.sum()))
    support = cm.cpu().double().sum(dim=1)  # (K,) TP + FN: the examples of each true class
    scores = {name: metric(y_true, y_pred, num_classes, average=None)  # (K,) each
              for name, metric in (("precision", precision), ("recall", recall), ("f1", f1_score))}
    macro = {name: _average(per_class, support, "macro", None) for name, per_class in scores.items()}
    weighted = {name: _average(per_class, support, "weighted", None) for name, per_class in scores.items()}
    return ClassificationReport(
        label_names=names,
        accuracy=float(cm.diagonal().sum()) / int(cm.sum()),
        precision=scores["precision"].tolist(),
        recall=scores["recall"].tolist(),
        f1=scores["f1"].tolist(),
        support=[int(count) for count in support.tolist()],
        macro_precision=macro["precision"],
        macro_recall=macro["recall"],
        macro_f1=macro["f1"],
        weighted_precision=weighted["precision"],
        weighted_recall=weighted["recall"],
        weighted_f1=weighted["f1"],
        confusion_matrix=cm.cpu().tolist(),
    )


def format_report(report: ClassificationReport, digits: int = 4, percent: bool = False) -> str:
    """The report as a plain-text table, then the confusion matrix labelled with class names.
    Scores as fractions with `digits` decimals (scikit-learn's look), or as percentages."""
    rows_names = [*report.label_names, "accuracy", "macro avg", "weighted avg"]
    name_width = max(len(name) for name in rows_names)
    width = max(len("precision"), digits + 5)
    support_width = max(len("support"), len(str(report.num_samples)))

    def number(value: float) -> str:
        return f"{f'{100 * value:.{digits}f}%' if percent else f'{value:.{digits}f}':>{width}}"

    lines = [
        f"{'':<{name_width}}  {'precision':>{width}}  {'recall':>{width}}  "
        f"{'f1-score':>{width}}  {'support':>{support_width}}",
        "",
    ]
    for k, name in enumerate(report.label_names):
        lines.append(
            f"{name:>{name_width}}  {number(report.precision[k])}  {number(report.recall[k])}  "
            f"{number(report.f1[k])}  {report.support[k]:>{support_width}}"
        )
    lines.append("")
    lines.append(
        f"{'accuracy':>{name_width}}  {'':>{width}}  {'':>{width}}  "
        f"{number(report.accuracy)}  {report.num_samples:>{support_width}}"
    )
    for label, (p, r, f) in (
        ("macro avg", (report.macro_precision, report.macro_recall, report.macro_f1)),
        ("weighted avg", (report.weighted_precision, report.weighted_recall, report.weighted_f1)),
    ):
        lines.append(
            f"{label:>{name_width}}  {number(p)}  {number(r)}  {number(f)}  {report.num_samples:>{support_width}}"
        )

    lines += ["", "confusion matrix (rows: true class, columns: predicted class)", ""]
    corner = "true \\ predicted"
    first_width = max(len(corner), *(len(name) for name in report.label_names))
    cells = [str(count) for row in report.confusion_matrix for count in row]
    cell_width = max(len(text) for text in [*report.label_names, *cells])
    lines.append(f"{corner:<{first_width}}" + "".join(f"  {name:>{cell_width}}" for name in report.label_names))
    for name, row in zip(report.label_names, report.confusion_matrix):
        lines.append(f"{name:<{first_width}}" + "".join(f"  {count:>{cell_width}}" for count in row))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- comparing two classifiers


def discordant_counts(y_true: Labels, pred_a: Labels, pred_b: Labels) -> tuple[int, int]:
    """(b, c): the texts classifier A gets right and B wrong, and the texts B gets right and A
    wrong. Texts both get right, or both wrong, say nothing about which of the two is better."""
    true, a = _label_pair(y_true, pred_a, None)
    b = _label_pair(y_true, pred_b, None)[1].to(true.device)
    a_right, b_right = a == true, b == true  # (N,), (N,)
    return int((a_right & ~b_right).sum()), int((~a_right & b_right).sum())


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test, from the discordant counts (`discordant_counts`).

    If A and B were equally good, each of the n = b + c texts on which they disagree would be A's
    win or B's with probability 1/2, like a fair coin: the smaller count follows Binomial(n, 1/2),
    and p = min(1, 2 P[X <= min(b, c)]), the chance of a split at least this lopsided either way.
    p = 1 when they never disagree. Exact integers: the binomial coefficients are summed and
    divided by 2^n once, so no count overflows or underflows on the way (only a p below ~1e-308
    rounds to 0.0).
    """
    for name, count in (("b", b), ("c", c)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} = {count!r}: discordant counts are ints >= 0 (texts, from discordant_counts)")
    n, smaller = b + c, min(b, c)
    term, tail = 1, 1  # C(n, 0), and the sum of C(n, k) for k <= smaller
    for k in range(smaller):
        term = term * (n - k) // (k + 1)  # C(n, k + 1), exact
        tail += term
    return min(1.0, 2 * tail / 2**n)  # Python divides big integers correctly rounded


# --------------------------------------------------------------------------- checking the input


def _check_arguments(num_classes: int, average: str | None, pos_label: int | None) -> None:
    if average not in AVERAGES:
        raise ValueError(f"average={average!r} is not one of {AVERAGES}")
    _check_num_classes(num_classes)
    if average == "binary" and pos_label is not None and (
        isinstance(pos_label, bool) or not isinstance(pos_label, int) or not 0 <= pos_label < num_classes
    ):
        raise ValueError(f"pos_label={pos_label!r} is not a class index in [0, {num_classes})")


def _as_label_tensor(values: Labels, name: str) -> torch.Tensor:
    """A 1-D int64 tensor of class indices from an integer tensor or a list of ints."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
            raise ValueError(
                f"{name} has dtype {values.dtype}; labels must be integer class indices "
                f"(from logits use logits.argmax(-1); from a float tensor use .long())"
            )
        if values.dim() != 1:
            raise ValueError(f"{name} has shape {tuple(values.shape)}; labels must be a 1-D tensor (N,)")
        return values.long()
    if isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"{name}[{i}] = {value!r} ({type(value).__name__}); labels must be int class indices"
                )
        return torch.tensor(values, dtype=torch.long)
    raise ValueError(f"{name} is a {type(values).__name__}; pass a 1-D integer tensor or a list of ints")


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")


def _check_range(labels: torch.Tensor, name: str, num_classes: int | None) -> None:
    """Labels index classes: each must lie in [0, num_classes) (or be >= 0 when K is not given)."""
    outside = labels < 0
    if num_classes is not None:
        outside |= labels >= num_classes
    if outside.any():
        i = int(outside.nonzero()[0, 0])
        allowed = f"[0, {num_classes})" if num_classes is not None else "[0, inf)"
        raise ValueError(
            f"{name}[{i}] = {int(labels[i])} is outside {allowed}: labels are class indices "
            f"0..num_classes-1; check num_classes or the mapping from names to indices"
        )


def _label_pair(y_true: Labels, y_pred: Labels, num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both label vectors checked and on one device (y_true's when it is a tensor)."""
    if num_classes is not None:
        _check_num_classes(num_classes)
    true = _as_label_tensor(y_true, "y_true")
    pred = _as_label_tensor(y_pred, "y_pred")
    if len(true) != len(pred):
        raise ValueError(f"y_true has {len(true)} labels but y_pred has {len(pred)}; pass one prediction per example")
    device = true.device if isinstance(y_true, torch.Tensor) else pred.device
    true, pred = true.to(device), pred.to(device)
    _check_range(true, "y_true", num_classes)
    _check_range(pred, "y_pred", num_classes)
    return true, pred


def _check_not_empty(num_samples: int) -> None:
    if num_samples == 0:
        raise ValueError("y_true and y_pred are empty: a metric over no examples is undefined")
