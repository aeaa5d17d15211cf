"""What the commands tell and leave behind: machinery the chapter never mentions.

A finished run's evaluation as text (`describe_result`), metrics.json, the optional plots, and
the run folder, which is built aside and appears only when complete (`staged_output`); the
--compare table and compare.json are comparison.py's; and the reading and printing of the
`python classify.py` command (`classify_command`). Library code never prints: train.py hands a
`Log` around, and only rank 0's prints (distributed.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import distributed
import evaluation
import hfformat
import hub
import metrics
import serve

Log = Callable[[str], None]
RunResult = Any  # train.RunResult, read by its fields: train.py imports this module, never the reverse


def quiet(message: str) -> None:
    """The log of every process but rank 0."""


@dataclass
class Console:
    """Where train.py prints: whole lines (`line`), and progress (`progress`) that the next line
    replaces on a terminal; where the output is no terminal (a file, a pipe, a notebook), progress
    lines are lines too. Text from users (paths, class names) is printed escaped."""

    open: bool = False  # a progress line is on screen, not yet ended

    def line(self, message: str) -> None:
        if self.open:
            sys.stdout.write("\n")
            self.open = False
        print(hub.printable(message, keep="\n"), flush=True)

    def progress(self, message: str) -> None:
        if not sys.stdout.isatty():
            return self.line(message)
        sys.stdout.write("\r" + hub.printable(message) + "\x1b[K")  # back to the start, clear to the end
        sys.stdout.flush()
        self.open = True


@dataclass
class Ticker:
    """A long piece of work told as it goes (`add` what was just done, in any unit the work grows
    with: tokens, say), with the time left: at most every tenth of it, and nothing in its first two
    seconds (quick work stays quiet)."""

    what: str
    total: int
    tell: Log
    done: int = 0
    told: int = 0  # tenths told so far
    started: float = field(default_factory=time.perf_counter)

    def add(self, count: int) -> None:
        self.done += count
        elapsed, tenth = time.perf_counter() - self.started, 10 * self.done // max(self.total, 1)
        if tenth > self.told and elapsed > 2 and self.done < self.total:
            self.told = tenth
            self.tell(f"{self.what}: {self.done / self.total:.0%} done, "
                      f"time left {clock(elapsed / self.done * (self.total - self.done))}")


def clock(seconds: float) -> str:
    """h:mm:ss"""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def one_line(error: BaseException) -> str:
    return hub.printable(" ".join(str(error).split())) or type(error).__name__


def describe_result(result: RunResult, tokens, brief: bool = False, seeded: bool = False) -> str:
    """A finished run: its test report in full (the chapter's metrics and the confusion matrix),
    then one line; `brief` (a comparison's runs): the line alone; `seeded`: it names the seed."""
    test, positive = result.reports["test"], result.reports["test"].label_names[-1]
    line = (f"{result.strategy}{f', seed {result.seed}' if seeded else ''}: test accuracy "
            f"{test.accuracy:.2%}{evaluation.describe_unseen(result, tokens)}; {positive}: precision "
            f"{test.precision[-1]:.2%}, recall {test.recall[-1]:.2%}, F1 {test.f1[-1]:.2%}; "
            f"trained in {result.training_seconds:.1f} s")
    if brief:
        return line
    train, validation = result.reports["train"], result.reports["validation"]
    return (f"\naccuracy: train {train.accuracy:.2%}, validation {validation.accuracy:.2%} (the kept epoch, "
            f"{result.training.best_epoch}); test ({len(tokens.test):,} texts, loss {result.losses['test']:.4f}):\n"
            f"{metrics.format_report(test, 2, percent=True)}\n{line}")


# --------------------------------------------------------------------------- what train.py tells as it goes


@dataclass
class Progress:
    """Counts steps across epochs for the progress lines: speed and estimated time left."""

    total_steps: int
    log_every: int
    step: int = 0
    examples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def advance(self, batch_size: int) -> None:
        self.step += 1
        self.examples += batch_size

    def line(self, epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int, loss: float) -> str:
        elapsed = time.perf_counter() - self.started
        return (f"epoch {epoch + 1}/{epochs}  step {step_in_epoch}/{steps_per_epoch}  "
                f"{self.examples / elapsed:,.0f} examples/s  loss {loss:.4f}  "
                f"time left {clock(elapsed / self.step * (self.total_steps - self.step))}")


def epoch_line(record: Any, epochs: int, training: Any) -> str:
    return (f"epoch {record.epoch}/{epochs} done in {training.epoch_seconds[-1]:.1f} s: "
            f"train loss {record.train_loss:.4f} accuracy {record.train_accuracy:.2%}  |  "
            f"validation loss {record.validation_loss:.4f} accuracy {record.validation_accuracy:.2%}"
            + ("  (best so far)" if training.best_epoch == record.epoch else ""))


def describe_steps(cfg: Any, splits: Any, tokens: Any, gpt_model: Any, job: Any, class_weights: Any = None) -> str:
    """Steps 1-7 in one line each, as the run sets them up, and which texts the splits share."""
    runtime = job.runtime
    counts = " / ".join(f"{name} {len(dataset):,}" for name, dataset in tokens.items())
    truncated = sum(dataset.num_truncated for _, dataset in tokens.items())
    batch = f"batch size {cfg.batch_size}"
    if cfg.accumulation_steps > 1:
        batch += f" in {cfg.accumulation_steps} micro-batches"
    if runtime.world_size > 1:
        batch += (f" (the global batch: texts per weight update, shared by {runtime.world_size} processes, "
                  f"about {cfg.batch_size / runtime.world_size:g} each)")
    torchrun = (f"torchrun: {runtime.world_size} processes train together ({torch.distributed.get_backend()}, "
                f"DistributedDataParallel), rank 0 on {runtime.device}\n" if runtime.world_size > 1 else "")
    precision = str(job.precision).removeprefix("torch.")
    if job.precision != torch.float32:
        precision += " (autocast; the weights stay float32" + ("; gradients scaled)" if precision == "float16" else ")")
    rate = f"lr {cfg.lr:g}" + (f", {cfg.warmup} warmup updates" if cfg.warmup else "") + (
        f", {cfg.schedule} decay" if cfg.schedule != "constant" else "")
    clip = f", gradient norm clipped at {cfg.max_grad_norm:g}" if cfg.max_grad_norm is not None else ""
    return (f"{torchrun}1. labelled text: {cfg.data or 'SMS Spam Collection'} "
            f"({'balanced' if cfg.balanced else 'all data'}): {counts}; classes {', '.join(splits.label_names)}\n"
            f"2. tokenization: GPT-2 BPE, max_length {tokens.max_length} tokens, "
            f"{truncated} text{'s' if truncated != 1 else ''} cut to fit\n"
            f"3. GPT: {cfg.model}, {cfg.init} weights, {sum(p.numel() for p in gpt_model.parameters()):,} "
            f"parameters, on {runtime.device}, computing in {precision}\n"
            f"4. representation: pooling {cfg.pooling!r}; 5. classification head: "
            f"Linear({gpt_model.cfg.emb_dim} -> {len(splits.label_names)})\n"
            f"6. supervised loss: cross-entropy; 7. weight update: AdamW {rate}, weight decay "
            f"{cfg.weight_decay:g}, {batch}{clip}, {cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''}"
            + (f"; training seeds {', '.join(map(str, cfg.seeds))} (the split"
               f"{' and the random GPT' if cfg.init == 'random' else ''}: seed {cfg.seed})" if cfg.seeds else "")
            + "\n" + evaluation.describe_splits(splits, class_weights))


def describe_cache(cache: Any) -> str:
    """What "compute the frozen blocks once" did in this run."""
    if not cache.used:
        return f"frozen-prefix cache off ({cache.reason})"
    size = f"{cache.nbytes / 2**20:.1f} MiB" if cache.nbytes >= 2**20 else f"{cache.nbytes / 1024:.1f} KiB"
    what = f"frozen-prefix cache: outputs of the embeddings and blocks 0-{cache.start_block - 1}"
    if cache.shared:
        return f"{what}, from the frozen work done once for every run, {size} ({cache.dtype})"
    return f"{what} computed once, {size} ({cache.dtype}), built in {cache.seconds:.1f} s"


def describe_trainable(model: Any) -> str:
    """What trains in a classify.GPTClassifier, in words: 'head + final LayerNorm + blocks 10-11'."""
    adapters = {id(p) for m in model.modules() if hasattr(m, "lora_A") for p in (m.lora_A, m.lora_B)}
    trains = {name: any(p.requires_grad and id(p) not in adapters for p in module.parameters())
              for name, module in model.named_modules()}
    blocks = [i for i in range(len(model.gpt.h)) if trains[f"gpt.h.{i}"]]
    parts = [words for words, name in (("head", "head"), ("final LayerNorm", "gpt.ln_f")) if trains[name]]
    if blocks:
        parts.append(f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}")
    if adapters:
        parts.append(f"LoRA adapters in blocks 0-{len(model.gpt.h) - 1}")
    if trains["gpt.wte"] or trains["gpt.wpe"]:
        parts.append("embeddings")
    return " + ".join(parts) or "nothing"


def parameter_counts(model: Any) -> dict[str, float]:
    """Trainable and total parameters; a tied weight (lm_head = wte) counts once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "share": trainable / total}


# --------------------------------------------------------------------------- the run folder


@dataclass
class RunFacts:
    """What metrics.json records besides the results: how the run was asked for and set up."""

    cfg: object  # train.TrainConfig
    argv: list[str]
    tokens: object  # train.TokenizedSplits
    gpt_config: object  # gpt.GPTConfig
    runtime: distributed.Runtime
    precision: torch.dtype  # what autocast computed in
    started: float


def run_folder(strategy: str, seed: int, comparing: bool, several_seeds: bool) -> Path:
    """Where a run is written inside --out: the folder itself for one run; <strategy>/ in a
    comparison; <strategy>/seed-<seed>/ with several training seeds."""
    return Path(strategy if comparing else "", f"seed-{seed}" if several_seeds else "")


def metrics_document(result: RunResult, facts: RunFacts) -> dict:
    """Everything metrics.json holds. Timings sit under "timing" alone, so two runs with one seed
    on one device give identical documents once "timing" is dropped."""
    training, tokens = result.training, facts.tokens
    document: dict = {name: {**report.to_dict(), "loss": result.losses[name]}
                      for name, report in result.reports.items()}
    document.update(evaluation.metrics_entries(result, tokens, facts.cfg))  # test_unseen, duplicates, class weights
    document.update({
        "history": [asdict(record) for record in training.history],
        "validation_checks": training.step_checks,
        "best_epoch": training.best_epoch,
        "strategy": result.strategy,
        "trainable_parameters": result.parameters,
        "data": {"label_names": result.reports["train"].label_names, "max_length": tokens.max_length,
                 **{name: {"examples": len(d), "truncated": d.num_truncated} for name, d in tokens.items()}},
        "model": {"source": facts.cfg.model, "init": facts.cfg.init, **asdict(facts.gpt_config)},
        "prefix_cache": {k: v for k, v in asdict(training.cache).items() if k not in ("seconds", "shared")},
        "device": facts.runtime.device.type,
        "precision": str(facts.precision).removeprefix("torch."),
        "seed": facts.cfg.seed,
        **({"training_seed": result.seed} if facts.cfg.seeds else {}),  # --seeds: this run's; the split's is "seed"
        "arguments": {"argv": facts.argv, "config": {key: value for key, value in asdict(facts.cfg).items()
                                                     if key not in ("seeds", "reference")}},  # compare.json's
        "timing": {
            "total_seconds": time.perf_counter() - facts.started,  # from the start of the run to these metrics
            "training_seconds": result.training_seconds,  # prefix cache + epochs
            "prefix_cache_seconds": training.cache_seconds,  # every (re)build
            "epoch_seconds": training.epoch_seconds,  # each with its validation pass
            "training_examples_per_second": len(tokens.train) * len(training.history) / sum(training.epoch_seconds),
        },
    })
    if facts.runtime.distributed:
        document["timing"]["processes"] = facts.runtime.world_size  # the results do not depend on it
    return document


def write_json(path: Path, document: dict) -> None:
    with hub.atomic_open(path) as file:  # whole or not at all
        file.write((json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def plot_title(cfg) -> str:
    """What a plot shows, for its title: the data and the model."""
    model = Path(cfg.model).name + (", random weights" if cfg.init == "random" else "")
    return f"{Path(cfg.data).name if cfg.data else 'SMS Spam Collection'}, {model}"


MAX_CELLS_WRITTEN = 30  # classes up to which a confusion matrix plot writes each count in its cell
MAX_CLASSES_PLOTTED = 100  # beyond, the matrix is metrics.json's alone: a plot would be unreadable and slow


def write_plots(result: RunResult, folder: Path, final_folder: Path, cfg) -> str:
    """Loss and accuracy curves and the confusion matrices as PNG in `folder` (the run folder
    being built, which becomes `final_folder`). A plot that fails is a note, never the end of a
    finished run."""
    title = f"{plot_title(cfg)}, {result.strategy}" + (f" (seed {result.seed})" if cfg.seeds else "")
    try:
        written = _plot(result, folder, pyplot(), title)
    except Exception as error:  # noqa: BLE001 - matplotlib's failures are many; the run is what matters
        return f"--plot: no plots written ({type(error).__name__}: {one_line(error)})"
    return f"plots written in {final_folder}: {', '.join(written)}"


def _plot(result: RunResult, folder: Path, plt, title: str) -> list[str]:
    history, best = result.training.history, result.training.best_epoch
    epochs = [record.epoch for record in history]
    for quantity, scale, unit in (("loss", 1, ""), ("accuracy", 100, " (%)")):
        figure, axes = plt.subplots(figsize=(6, 3.8))
        for split in ("train", "validation"):
            axes.plot(epochs, [scale * getattr(r, f"{split}_{quantity}") for r in history], marker="o", label=split)
        axes.axvline(best, color="gray", linestyle=":", label=f"kept: epoch {best}")
        axes.set_xticks(epochs)  # whole epochs, however few
        axes.set(xlabel="epoch", ylabel=quantity + unit, title=f"{quantity}: {title}")
        axes.title.set_fontsize(9)
        axes.legend(fontsize=8)
        save_figure(figure, folder / f"{quantity}.png", plt)
    written = ["loss.png", "accuracy.png"]
    for split, report in result.reports.items():
        names = report.label_names
        if len(names) > MAX_CLASSES_PLOTTED:
            continue
        figure, axes = plt.subplots(figsize=(4.5 + len(names) / 8, 4 + len(names) / 8))
        axes.imshow(report.confusion_matrix, cmap="Blues", vmin=0)
        axes.set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0)
        axes.set_yticks(range(len(names)), names)
        axes.set(xlabel="predicted", ylabel="true", title=f"{split}: accuracy {report.accuracy:.2%}\n{title}")
        axes.title.set_fontsize(9)
        darkest = max(max(row) for row in report.confusion_matrix)
        for i, row in enumerate(report.confusion_matrix if len(names) <= MAX_CELLS_WRITTEN else []):
            for j, count in enumerate(row):  # white on the dark cells, black on the light ones
                axes.text(j, i, f"{count:,}", ha="center", va="center",
                          color="white" if count > darkest / 2 else "black")
        save_figure(figure, folder / f"confusion_matrix_{split}.png", plt)
        written.append(f"confusion_matrix_{split}.png")
    if len(written) == 2:
        written.append(f"no confusion matrix plots (more than {MAX_CLASSES_PLOTTED} classes: see metrics.json)")
    return written


def pyplot() -> ModuleType:
    """matplotlib's pyplot, drawing into files, never a window (runner.check_config made sure it is there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, plt) -> None:
    """A PNG written whole (an interruption leaves none, never half of one)."""
    figure.tight_layout()
    with hub.atomic_open(path) as file:
        figure.savefig(file, format="png", dpi=120)
    plt.close(figure)


def point_latest(out: Path) -> Path | None:
    """runs/latest -> the run just finished (a symbolic link, replaced whole); None where the system
    allows no link (Windows without the right): the run is there all the same."""
    link, temporary = out.parent / "latest", out.parent / f".latest-{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(out.name, target_is_directory=True)
        os.replace(temporary, link)
        return link
    except OSError:
        return None


def example_text(test: Any, sms: bool) -> str:
    """A text to try the classifier on: for the SMS data a spam message in the book's style; for
    your own data, the first test text of the last class (the positive one), cut to a few words."""
    if sms:
        return "WINNER!! Claim your free prize now"
    positive = len(test.label_names) - 1
    text = " ".join(next((t for t, y in zip(test.texts, test.labels) if y == positive), test.texts[0]).split())
    return text if len(text) <= 60 else text[:60].rsplit(" ", 1)[0] + "..."


def describe_end(out: Path, folders: list[Path], latest: Path | None, best: Path | None, example: str,
                 seconds: float) -> str:
    """The last lines of a run: where it is, and the exact command to try the classifier with the
    best validation accuracy (`best`; None when every run was a baseline, which classify.py cannot load)."""
    where = f"saved to {out}" + (f" (also {latest})" if latest is not None else "")
    if len(folders) > 1:
        where += f": one folder per run, {folders[0].relative_to(out)}, ..."
    if best is None:
        return f"\n{where}; total time {seconds:.1f} s"
    model = latest if latest is not None and len(folders) == 1 else best
    return (f"\n{where}; total time {seconds:.1f} s\n"
            + (f"the best validation accuracy: {best.relative_to(out)}\n" if len(folders) > 1 else "")
            + f"try it: python classify.py --model {shlex.quote(str(model))} {shlex.quote(example)}")


@contextlib.contextmanager
def staged_output(out: Path, runtime: distributed.Runtime, finished: Callable[[], bool]) -> Iterator[Path | None]:
    """The run folder being built, on rank 0 alone (None on the other processes, which write
    nothing); every process learns whether rank 0 could create it before any work starts. An
    interruption keeps the runs `finished()` says are done (hub.staged_folder)."""
    with contextlib.ExitStack() as stack:
        create = (lambda: stack.enter_context(hub.staged_folder(out, "--out", finished))
                  if runtime.is_main_process else None)
        yield distributed.together(runtime, create)


# --------------------------------------------------------------------------- the classify.py command


MAX_INPUT_BYTES, MAX_TEXTS = 64 * 2**20, 200_000  # each text costs about 1 KB in flight: bounded memory


def read_texts(source: str) -> list[str]:
    """One text per line of the file `source` ("-": standard input, read the same way: UTF-8, at
    most MAX_INPUT_BYTES). Every line counts, blank lines included, so output i answers line i."""
    try:
        if source == "-":
            raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with open(source, "rb") as file:
                raw = file.read(MAX_INPUT_BYTES + 1)
        if len(raw) > MAX_INPUT_BYTES:
            raise ValueError(f"more than {MAX_INPUT_BYTES // 2**20} MiB of text; classify it in parts")
        content = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"cannot read {source}: {error}") from None  # one line: classify_command's one_line
    if content.count("\n") > MAX_TEXTS:
        raise ValueError(f"cannot read {source}: more than {MAX_TEXTS:,} lines; classify it in parts")
    lines = content.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.removesuffix("\r") for line in lines]


MAX_BATCH, CHUNK, SHOWN = 4096, 1024, 10  # texts per batch at most; texts classified then printed; classes shown


def classify_command(classify: ModuleType, argv: list[str] | None = None) -> int:
    """`python classify.py --model RUN_DIR "text" ...`: returns the exit code (0, or 2 with one line
    on stderr). `classify` is classify.py, which its `__main__` block passes in: this module never
    imports it, so the imports flow one way. Texts are classified and printed a chunk at a time,
    and a model of many classes shows the most likely ten: memory stays what the model reads."""
    parser = argparse.ArgumentParser(
        prog="classify.py", description="Classify texts with a fine-tuned GPT-2 classifier saved by train.py.",
        epilog="An empty text is classified as the single token <|endoftext|> (the model's view of 'no text'). "
        "A text longer than the run's max_length keeps its first max_length tokens, as in training. "
        f"With more than {SHOWN} classes, the {SHOWN} most likely are shown. Messages per second go to stderr.")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="folder written by train.py or transformers")
    parser.add_argument("--export-hf", metavar="OUT_DIR", help="instead, write it as a transformers classifier folder")
    parser.add_argument("--file", metavar="F", help="read one text per line from F ('-' for stdin)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {text, label, probabilities}")
    parser.add_argument("--batch-size", type=int, default=32, help=f"texts per batch, at most {MAX_BATCH} (default 32)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)")
    parser.add_argument("--serve", action="store_true", help="instead, serve a page and POST /classify over HTTP "
                        "until Ctrl-C (docs/serving.md)")
    parser.add_argument("--host", default="127.0.0.1", help="with --serve: address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="with --serve: port to listen on (default 8000)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already reported
        return int(exit_.code or 0)
    try:
        with sigterm_as_ctrl_c():
            return _classify(classify, args)
    except ValueError as error:
        print(f"classify.py: error: {one_line(error)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("classify.py: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `| head -1` closed the pipe: stop quietly
        return hub.quiet_closed_stdout()
    except (MemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        print("classify.py: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
    return 2


def _classify(classify: ModuleType, args: argparse.Namespace) -> int:
    if args.export_hf is not None:  # machinery: hfformat.py writes transformers' layout
        if not args.export_hf or args.texts or args.file or args.json:
            raise ValueError("--export-hf OUT_DIR writes a folder and classifies nothing: give it a folder name, "
                             "and no texts, --file or --json")
        model, config = classify.load_classifier(args.model)
        exported = hfformat.export_classifier(classify.classifier_tensors(model), config.gpt, config.label_names,
                                              config.pooling, config.max_length, args.export_hf)
        print(hub.printable(exported.describe()))
        return 0
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise ValueError(f"--batch-size {args.batch_size}: must be between 1 and {MAX_BATCH}")
    if args.serve and (args.texts or args.file or args.json):
        raise ValueError("--serve classifies what the page and POST /classify send: give no texts, --file or --json")
    texts = list(args.texts) + (read_texts(args.file) if args.file else [])
    if not texts and not args.serve:
        raise ValueError("nothing to classify: give texts as arguments or --file F ('-' for stdin)")
    device = distributed.pick_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = classify.load_classifier(args.model, device)
    if args.serve:  # machinery: serve.py answers HTTP with classify.predict (docs/serving.md)
        return serve.run(lambda batch: [asdict(p) for p in classify.predict(model, config, batch, args.batch_size)],
                         serve.model_facts(args.model, config.label_names, config.max_length), args.host, args.port)
    if hasattr(sys.stdout, "reconfigure"):  # an emoji to an ASCII-only terminal: \U0001f600, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    start, top = time.perf_counter(), SHOWN if config.num_classes > SHOWN else None
    print("[" if args.json else "", end="")
    for first in range(0, len(texts), CHUNK):
        for i, p in enumerate(classify.predict(model, config, texts[first : first + CHUNK], args.batch_size, top=top)):
            if args.json:  # JSON escapes C0 controls itself; the rest as \uXXXX, still valid JSON
                item = json.dumps(asdict(p), ensure_ascii=False)
                print(("," if first + i else "") + "\n  " + hub.UNPRINTABLE.sub(
                    lambda m: m.group() if m.group() < " " else f"\\u{ord(m.group()):04x}", item), end="")
            else:
                probabilities = " ".join(f"{evaluation.shorten(name, 30)}={value:.3f}"
                                         for name, value in p.probabilities.items())
                print(f"{evaluation.shorten(p.label, 30)}\t{probabilities}\t{evaluation.shorten(p.text)}")
    print("\n]" if args.json else "", end="\n" if args.json else "", flush=True)
    seconds = time.perf_counter() - start
    print(f"{len(texts)} texts in {seconds:.2f} s: {len(texts) / max(seconds, 1e-9):.1f} messages/s on {device}",
          file=sys.stderr)
    return 0


def stop_like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (kill, docker stop, a scheduler) stops a command as Ctrl-C does: nothing half-written."""
    previous_handler = signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is running out of memory: MemoryError, or torch's allocator's RuntimeError."""
    return isinstance(error, MemoryError) or "out of memory" in str(error) or "can't allocate memory" in str(error)
