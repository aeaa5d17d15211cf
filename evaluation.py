"""What a test score is worth: machinery around the chapter's "Avaliando classificadores de texto"
that the chapter never mentions. Three questions to ask of an accuracy before believing it:

- Were the test texts seen in training? The SMS file repeats texts, and the book's split puts 38
  of its 300 test texts in the training split too (data.seen_in). Every run counts them (the log,
  metrics.json's "duplicates") and scores the test texts not seen in training apart
  ("test_unseen"); --dedup drops the repeats before splitting (data.load_splits).
- What does a classifier without GPT-2 score? `--compare majority,bag-of-words,last-block` adds
  two baselines, fitted on the same training texts and scored with the same metrics; each is a
  row of the comparison like a strategy (train.fit_baseline).
- Which texts does it get wrong, and how sure was it? mistakes.tsv in the run folder lists every
  misclassified test text with each class's probability; the log shows the most confident.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import data
import hub
import metrics

RunResult = Any  # train.RunResult, read by its fields: nothing imports train.py
DUPLICATES = "texts equal after Unicode NFC normalisation and stripping surrounding whitespace"  # data.duplicate_key
BASELINES = {
    "majority": "the training split's most frequent class for every text (no features)",
    "bag-of-words": "logistic regression over each text's GPT-2 token counts (L2 penalty, C = 1, fitted by L-BFGS on "
                    "the whole training split, as scikit-learn's default), no GPT-2",
}
VOCABULARY = data.END_OF_TEXT_ID + 1  # GPT-2's 50,257 token ids


# --------------------------------------------------------------------------- baselines


def token_counts(token_ids: list[list[int]]) -> torch.Tensor:
    """How often each GPT-2 token occurs in each text: a sparse (N, V) float64 matrix."""
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)  # (N,)
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)  # each token's text
    columns = torch.tensor([token for ids in token_ids for token in ids], dtype=torch.long)
    ones = torch.ones(len(columns), dtype=torch.float64)
    shape = (len(token_ids), VOCABULARY)
    return torch.sparse_coo_tensor(torch.stack([rows, columns]), ones, shape, check_invariants=True).coalesce()


@dataclass
class Baseline:
    """A linear classifier of a text's token counts, logits = counts @ weight + bias. "majority"
    has no weight (None): its bias, the log class frequencies, is the best a bias alone can do."""

    weight: torch.Tensor | None  # (V, K) float64
    bias: torch.Tensor  # (K,) float64

    def logits(self, token_ids: list[list[int]]) -> torch.Tensor:
        if self.weight is None:
            return self.bias.expand(len(token_ids), -1).float()  # (N, K)
        return (torch.sparse.mm(token_counts(token_ids), self.weight) + self.bias).float()  # (N, K)


def fit_baseline(name: str, train: data.ClassificationDataset, num_classes: int,
                 class_weights: torch.Tensor | None = None) -> Baseline:
    """`name`'s classifier fitted on the training texts; deterministic (a zero start, the whole
    split at every step), so the seed changes nothing but the split. "bag-of-words" minimises
    the summed cross-entropy (each text's term times its class's weight, with --class-weights)
    plus half the squared weights, scikit-learn's LogisticRegression(C=1); ids never seen in
    training keep weight 0. "majority" ignores class weights: it is the majority by definition."""
    labels = torch.tensor(train.labels, dtype=torch.long)  # (N,)
    if name == "majority":
        counts = torch.bincount(labels, minlength=num_classes).double()  # (K,)
        return Baseline(None, (counts.clamp(min=1e-9) / len(labels)).log())  # an absent class: very unlikely
    counts = token_counts(train.token_ids)  # (N, V)
    weight = torch.zeros(VOCABULARY, num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=100, line_search_fn="strong_wolfe")
    text_weights = None if class_weights is None else class_weights.double()

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.sparse.mm(counts, weight) + bias  # (N, K)
        loss = F.cross_entropy(logits, labels, weight=text_weights, reduction="sum") + 0.5 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return Baseline(weight.detach(), bias.detach())


@dataclass
class BaselineRun:
    """A baseline fitted and scored on every split, as a strategy's run is."""

    reports: dict[str, metrics.ClassificationReport]
    losses: dict[str, float]  # plain mean cross-entropy, as for a strategy
    test_predictions: list[int]
    test_probabilities: list[list[float]]
    parameters: dict[str, float]
    seconds: float  # fitting


def run_baseline(name: str, tokens: data.TokenizedSplits, label_names: list[str],
                 class_weights: torch.Tensor | None = None) -> BaselineRun:
    """Fit `name` on the training split, then score it on every split with the chapter's metrics."""
    started = time.perf_counter()
    baseline = fit_baseline(name, tokens.train, len(label_names), class_weights)
    seconds = time.perf_counter() - started
    logits = {split: baseline.logits(dataset.token_ids) for split, dataset in tokens.items()}  # (N, K) each
    reports = {split: metrics.classification_report(dataset.labels, logits[split].argmax(dim=-1), label_names)
               for split, dataset in tokens.items()}
    losses = {split: F.cross_entropy(logits[split], torch.tensor(dataset.labels)).item()
              for split, dataset in tokens.items()}
    size = baseline.bias.numel() + (0 if baseline.weight is None else baseline.weight.numel())
    return BaselineRun(reports, losses, logits["test"].argmax(dim=-1).tolist(), logits["test"].softmax(dim=-1).tolist(),
                       {"trainable": size, "total": size, "share": 1.0}, seconds)


# --------------------------------------------------------------------------- texts seen in training


def describe_splits(splits: data.Splits, class_weights: torch.Tensor | None) -> str:
    """The log's line on duplicates between training and validation/test (and the class weights)."""
    seen = {name: sum(data.seen_in(getattr(splits, name).texts, splits.train.texts)) for name in ("validation", "test")}
    line = (f"{seen['test']} of {len(splits.test):,} test texts also appear in the training data, and "
            f"{seen['validation']} of {len(splits.validation):,} validation texts (duplicates: {DUPLICATES})")
    if splits.dropped:
        line = f"--dedup dropped {splits.dropped:,} repeated texts before splitting; " + line
    elif seen["test"] + seen["validation"]:
        line += "; the test metrics are also given without them; --dedup removes them"
    if class_weights is not None:
        weights = ", ".join(f"{shorten(name, 30)} {weight:.4g}"
                            for name, weight in zip(splits.label_names, class_weights.tolist()))
        line += f"\n6. class weights (--class-weights balanced, in the training loss only): {weights}"
    return line


def unseen_report(result: RunResult, tokens: data.TokenizedSplits) -> metrics.ClassificationReport | None:
    """The chapter's metrics on the test texts not seen in training (None: every one was)."""
    seen = data.seen_in(tokens.texts.test.texts, tokens.texts.train.texts)
    unseen = [i for i, known in enumerate(seen) if not known]
    if not unseen:
        return None
    return metrics.classification_report([result.test_labels[i] for i in unseen],
                                         [result.test_predictions[i] for i in unseen], tokens.texts.label_names)


def metrics_entries(result: RunResult, tokens: data.TokenizedSplits, cfg) -> dict:
    """What metrics.json adds: "test_unseen", "duplicates", "class_weights", and for a baseline,
    "baseline" (what it is; it saves no classifier)."""
    splits, unseen = tokens.texts, unseen_report(result, tokens)
    entries = {
        "test_unseen": None if unseen is None else unseen.to_dict(),
        "duplicates": {"definition": DUPLICATES, "dedup": cfg.dedup, "dropped_by_dedup": splits.dropped,
                       **{f"{name}_in_training": sum(data.seen_in(getattr(splits, name).texts, splits.train.texts))
                          for name in ("validation", "test")}},
        "class_weights": None if cfg.class_weights == "none" else
        dict(zip(splits.label_names, data.class_weights(splits.train).tolist())),
    }
    if result.strategy in BASELINES:
        entries["baseline"] = {"what": BASELINES[result.strategy],
                               "classifier": "none saved: classify.py loads GPT-2 classifiers only"}
    return entries


# --------------------------------------------------------------------------- the mistakes


def mistakes(result: RunResult) -> list[int]:
    """The misclassified test texts' indices, most confident first (the probability the wrong
    class got; equals in test order)."""
    wrong = [i for i, (y, p) in enumerate(zip(result.test_labels, result.test_predictions)) if y != p]
    return sorted(wrong, key=lambda i: -result.test_probabilities[i][result.test_predictions[i]])


def write_mistakes(path: Path, result: RunResult, tokens: data.TokenizedSplits) -> None:
    """mistakes.tsv: every misclassified test text, most confident first, with its true and
    predicted class, each class's probability, and whether it is also in the training data.
    Tab-separated and quoted as the csv module does (a text holding a tab, a newline or a quote
    is put in quotes), so csv.reader(file, dialect="excel-tab") reads back the exact texts."""
    texts, names = tokens.texts.test.texts, tokens.texts.label_names
    seen = data.seen_in(texts, tokens.texts.train.texts)
    with path.open("w", encoding="utf-8", errors="backslashreplace", newline="") as file:
        writer = csv.writer(file, dialect="excel-tab")  # lines end in \r\n: a lone \r in a text is then quoted too
        writer.writerow(["text", "true", "predicted", *(f"p({name})" for name in names), "in_training"])
        for i in mistakes(result):
            writer.writerow([texts[i], names[result.test_labels[i]], names[result.test_predictions[i]],
                             *(f"{p:.6f}" for p in result.test_probabilities[i]), "yes" if seen[i] else "no"])


def describe_unseen(result: RunResult, tokens: data.TokenizedSplits) -> str:
    """The test accuracy on the texts not seen in training, for the run's line ("" when none was)."""
    unseen, size = unseen_report(result, tokens), len(result.test_labels)
    if unseen is None:
        return " (every test text is also in training)"
    if unseen.num_samples == size:
        return ""
    return f" ({unseen.accuracy:.2%} on the {unseen.num_samples:,} not seen in training)"


def describe_mistakes(result: RunResult, tokens: data.TokenizedSplits, shown: int = 3) -> str:
    """The log's lines after a run's evaluation: the `shown` most confident mistakes, shortened and
    escaped."""
    wrong, names = mistakes(result), tokens.texts.label_names
    lines = [f"the {min(shown, len(wrong))} most confident of {len(wrong)} test mistakes (all in mistakes.tsv):"
             if wrong else "no test text misclassified"]
    for i in wrong[:shown]:
        true, predicted = (shorten(names[k], 30) for k in (result.test_labels[i], result.test_predictions[i]))
        probability = result.test_probabilities[i][result.test_predictions[i]]
        lines.append(f"  {true} taken for {predicted} (p({predicted}) {probability:.3f}): "
                     f"{shorten(tokens.texts.test.texts[i])}")
    return "\n".join(lines)


def shorten(text: str, width: int = 70) -> str:
    """One line of at most `width` characters, control characters escaped (printed text comes from users)."""
    text = hub.printable(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"
