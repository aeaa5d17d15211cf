"""Strategies side by side, as an experiment: several training seeds, their spread, and which
differences the test set can tell from noise. Machinery around the chapter's "Estratégias de
Fine-Tuning" (`python train.py --compare head,last-block --seeds 3`).

On a 300-text test set one accuracy point is 3 texts, and near 95% accuracy the binomial
standard error is about 1.3 points: one run per strategy cannot separate most differences. So
each strategy trains with N training seeds (a new head, another batch order, another LoRA
start) on the same split and from the same backbone, and this module reports, per strategy and
per metric, the mean, standard deviation, min and max over the seeds, then tests each strategy
against a reference on the same test texts with McNemar's exact test (`metrics.mcnemar_exact`).

Pairing: run i of a strategy against run i of the reference (the same training seed, so the
same batch order), one test per pair; a difference is marked significant (*) when every pair's
p-value is below 5%. Pooling the pairs into one test would count each text N times, as if the
N runs had seen N different test sets.

compare.json: "rows", one per strategy, with the keys a one-seed comparison always had (holding
means over the seeds), then "seeds", "spread", "runs" (each seed's numbers) and "vs_reference";
beside the rows, the reference, the test, the frozen work done once and the whole wall time.
With --plot, compare.png.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import evaluation
import fastpath
import metrics
import report

RunResult = report.RunResult
LEVEL = 0.05  # a difference is significant when p < 5%
METRICS = ("training_seconds", "train_accuracy", "validation_accuracy", "test_accuracy", "test_precision",
           "test_recall", "test_f1")


@dataclass
class Experiment:
    """What a comparison ran, besides each run's result."""

    strategies: list[str]
    seeds: list[int]
    reference: str
    test_labels: Sequence[int]  # the same for every run
    shared: fastpath.SharedPrefix | None  # the frozen work done once
    total_seconds: float  # the wall time so far


def run_row(result: RunResult) -> dict:
    """One run's line of the table: what it cost (parameters, time) and what it bought."""
    test = result.reports["test"]
    return {
        "strategy": result.strategy, "trainable_parameters": int(result.parameters["trainable"]),
        "training_seconds": result.training_seconds, "train_accuracy": result.reports["train"].accuracy,
        "validation_accuracy": result.reports["validation"].accuracy, "test_accuracy": test.accuracy,
        "positive_class": test.label_names[-1], "test_precision": test.precision[-1],
        "test_recall": test.recall[-1], "test_f1": test.f1[-1],
    }


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (None for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def paired_test(run: RunResult, reference: RunResult, test_labels: Sequence[int]) -> dict:
    """McNemar's exact test of one run against one reference run, on the same test texts."""
    b, c = metrics.discordant_counts(list(test_labels), run.test_predictions, reference.test_predictions)
    p_value = metrics.mcnemar_exact(b, c)
    return {"seed": run.seed, "reference_seed": reference.seed, "right_only_here": b, "right_only_reference": c,
            "p_value": p_value, "significant": p_value < LEVEL}


def comparison_document(results: list[RunResult], experiment: Experiment, cfg, argv: list[str]) -> dict:
    """Everything compare.json holds."""
    runs = {strategy: [r for r in results if r.strategy == strategy] for strategy in experiment.strategies}
    rows = []
    for strategy, strategy_runs in runs.items():
        per_seed = [{"seed": result.seed, **run_row(result)} for result in strategy_runs]
        row = run_row(strategy_runs[0])
        row["seeds"] = [result.seed for result in strategy_runs]
        row["spread"] = {key: spread([run[key] for run in per_seed]) for key in METRICS}
        row.update({key: row["spread"][key]["mean"] for key in METRICS})  # one seed: the run's own numbers
        if strategy != experiment.reference:
            pairs = [paired_test(run, reference, experiment.test_labels)
                     for run, reference in zip(strategy_runs, runs[experiment.reference])]
            row["vs_reference"] = {"reference": experiment.reference, "pairs": pairs,
                                   "significant_pairs": sum(pair["significant"] for pair in pairs),
                                   "significant": all(pair["significant"] for pair in pairs)}
        row["runs"] = per_seed
        rows.append(row)
    shared = experiment.shared
    return {
        "rows": rows,
        "seeds": experiment.seeds,
        "reference": experiment.reference,
        "significance": {"test": "McNemar's exact test, two-sided, on the test texts", "level": LEVEL,
                         "pairing": "run i of each strategy against run i of the reference (the same training seed)",
                         "marked": "significant when every pair's p-value is below the level"},
        "frozen_work": None if shared is None else {"seconds": shared.seconds, "steps": shared.steps,
                                                    "bytes": shared.nbytes},
        "total_seconds": experiment.total_seconds,  # the whole comparison, from the start to this table
        "arguments": {"argv": argv, "config": asdict(cfg)},
    }


def _mean_cell(row: dict, key: str, scale: float = 100, unit: str = "%") -> str:
    """The mean over the seeds, and ± the standard deviation when there are several."""
    numbers = row["spread"][key]
    spread = "" if numbers["std"] is None else f" ± {numbers['std'] * scale:.1f}"
    return f"{numbers['mean'] * scale:.1f}{spread}{unit}"


def _count(parameters: int) -> str:
    """12,834 as 12.8K; 124,439,808 as 124.4M."""
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "K")):
        if parameters >= size:
            return f"{parameters / size:.1f}{suffix}"
    return str(parameters)


def _significance_cell(row: dict) -> str:
    versus = row.get("vs_reference")
    if versus is None:
        return "reference"
    p_values = [pair["p_value"] for pair in versus["pairs"]]
    mark = " *" if versus["significant"] else ""
    if len(p_values) == 1:
        return f"p = {p_values[0]:.2g}{mark}"
    return f"p <= {max(p_values):.2g}, {versus['significant_pairs']} of {len(p_values)} < 5%{mark}"


def format_comparison(document: dict) -> str:
    """One table, within 100 columns: what each strategy costs (trainable parameters, time) and
    what it buys (validation and test accuracy, the positive class's F1), mean ± std over the
    seeds, and its test against the reference; then how to read it. Precision, recall, train
    accuracy, min and max are in compare.json."""
    rows, reference, seeds = document["rows"], document["reference"], document["seeds"]
    header = ["strategy", "params", "time", "val acc", "test acc", f"test F1 {rows[0]['positive_class']}"[:18],
              f"vs {reference}"]
    table = [[row["strategy"], _count(row["trainable_parameters"]),
              _mean_cell(row, "training_seconds", 1, " s"),
              *(_mean_cell(row, key) for key in ("validation_accuracy", "test_accuracy", "test_f1")),
              _significance_cell(row)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i in (0, len(header) - 1) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in [header, *table]]
    if len(seeds) > 1:
        lines.append(f"\nmean ± standard deviation over {len(seeds)} training seeds ({', '.join(map(str, seeds))})")
    lines.append(f"vs {reference}: McNemar's exact test, two-sided, on the same test texts; * = significant at 5%"
                 + ("\n  (run i against its run i: the largest p, and the pairs below 5%; * in every pair)"
                    if len(seeds) > 1 else ""))
    frozen = document["frozen_work"]
    if frozen is not None:
        lines.append(f"time: each run's own training; the frozen work done once for all runs took "
                     f"{frozen['seconds']:.1f} s more")
    lines.append(f"whole comparison: {document['total_seconds']:.1f} s; precision, recall, min and max: compare.json")
    return "\n".join(lines)


def write_comparison(folder: Path, final_folder: Path, results: list[RunResult], experiment: Experiment,
                     cfg, argv: list[str]) -> str:
    """compare.json (and with --plot compare.png) in `folder`, the run folder being built, which
    becomes `final_folder`; returns the table for the log."""
    document = comparison_document(results, experiment, cfg, argv)
    report.write_json(folder / "compare.json", document)
    text = "\n" + format_comparison(document)
    if cfg.plot:
        text += "\n" + write_plot(document, folder, final_folder, report.plot_title(cfg))
    return text


def write_plot(document: dict, folder: Path, final_folder: Path, title: str) -> str:
    """compare.png: per strategy, test accuracy and the positive class's F1 (bars: the mean;
    whiskers: min to max over the seeds; * beside a significant difference from the reference),
    and beside them the training time."""
    plt = report.pyplot()
    rows, positive, seeds = document["rows"], document["rows"][0]["positive_class"], len(document["seeds"])
    names = [row["strategy"] + (" *" if row.get("vs_reference", {}).get("significant") else "") for row in rows]
    positions = list(range(len(rows)))
    figure, (scores, times) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 4.2),
                                           gridspec_kw={"width_ratios": [2, 1]})

    def bars(axes, key: str, offset: float, width: float, label: str, color: str, scale: float):
        numbers = [row["spread"][key] for row in rows]
        means = [n["mean"] * scale for n in numbers]
        whiskers = [[m - n["min"] * scale for m, n in zip(means, numbers)],
                    [n["max"] * scale - m for m, n in zip(means, numbers)]] if seeds > 1 else None
        axes.bar([p + offset for p in positions], means, width, yerr=whiskers, capsize=4, label=label, color=color)
        for p, m, n in zip(positions, means, numbers):  # the mean, above the top whisker
            axes.annotate(f"{m:.1f}", (p + offset, n["max"] * scale), xytext=(0, 3), textcoords="offset points",
                          ha="center", va="bottom", fontsize=8)
        return numbers

    accuracy = bars(scores, "test_accuracy", -0.2, 0.4, "test accuracy (%)", "tab:blue", 100)
    f1 = bars(scores, "test_f1", 0.2, 0.4, f"test F1 of {positive} (%)", "tab:orange", 100)
    lowest = min(n["min"] for n in accuracy + f1) * 100
    scores.set_ylim(max(0.0, 10 * int(lowest // 10) - 10), 108)  # the axis starts below the lowest whisker
    scores.set_xticks(positions, names)
    scores.set_ylabel("on the test set")
    scores.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, frameon=False, fontsize=8)
    scores.set_title((f"{title}\nmean of {seeds} seeds, whiskers min-max" if seeds > 1 else
                      f"{title}\none seed") + (f"; * differs from {document['reference']} (McNemar, 5%)"
                                                          if len(rows) > 1 else ""), fontsize=9)
    durations = bars(times, "training_seconds", 0.0, 0.6, "training time", "tab:gray", 1)
    logarithmic = max(n["max"] for n in durations) > 20 * max(min(n["min"] for n in durations), 1e-9)
    if logarithmic:
        times.set_yscale("log")  # head and all differ 100-fold: a linear axis hides the short ones
    times.margins(y=0.15)
    times.set_xticks(positions, [row["strategy"] for row in rows], rotation=30, ha="right")
    times.set_ylabel("seconds per run" + (" (log scale)" if logarithmic else ""))
    times.set_title("training time" + ("\n(the frozen work done once apart)" if document["frozen_work"] else ""),
                    fontsize=9)
    report.save_figure(figure, folder / "compare.png", plt)
    return f"plot written: {final_folder / 'compare.png'}"


MAX_SEEDS = 100  # training seeds per strategy: each is a whole training run


def parse_seeds(text: str, seed: int) -> list[int]:
    """--seeds: a count N gives the training seeds seed, seed + 1, ..., seed + N - 1 (N = 1 gives
    [], the plain run); a comma-separated list gives its own seeds. Checked before anything is
    built: at most MAX_SEEDS, each in 0..2**63-1 (what torch.manual_seed takes), none twice."""
    parts = [part.strip() for part in text.split(",")]
    try:
        numbers = [int(part) for part in parts if part]
    except ValueError:
        numbers = []
    count = numbers[0] if len(parts) == 1 and numbers else len(numbers)
    flag = f"--seeds {evaluation.shorten(text, 60)}"
    if not numbers or not 1 <= count <= MAX_SEEDS:
        raise ValueError(f"{flag}: give a number of seeds from 1 to {MAX_SEEDS} (e.g. 3) or a list of different "
                         "seeds (e.g. 1,2,3)")
    seeds = [seed + i for i in range(count)] if len(parts) == 1 else numbers
    if not all(0 <= s < 2**63 for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"{flag}: seeds must be different and in 0..2**63-1")
    return [] if seeds == [seed] and len(parts) == 1 else seeds


def reference_strategy(reference: str | None, strategies: list[str]) -> str:
    """The strategy the others are tested against: --reference, else the book's last-block when it
    is compared, else the first one."""
    return reference or ("last-block" if "last-block" in strategies else strategies[0])
