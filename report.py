"""What the commands tell and leave behind: machinery the chapter never mentions.

The log lines train.py prints, the records of training (`EpochRecord`, `Training`, `RunResult`),
metrics.json, the optional plots, and the run folder, which is built aside and appears only when
complete (`staged_output`); the --compare table and compare.json are comparison.py's; and the
reading and printing of the `python classify.py` command (`classify_command`). Library code never
prints: train.py hands a `Log` around, and only rank 0's prints (distributed.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

import classify
import distributed
import fastpath
import hfformat
import hub
import metrics
import serve

Log = Callable[[str], None]


def print_line(message: str) -> None:
    print(hub.printable(message, keep="\n"), flush=True)  # class names and paths come from the user


def quiet(message: str) -> None:
    """The log of every process but rank 0."""


def one_line(error: BaseException) -> str:
    return hub.printable(" ".join(str(error).split())) or type(error).__name__


# --------------------------------------------------------------------------- records of training


@dataclass
class EpochRecord:
    epoch: int
    trainable: str  # what was trained this epoch (the gradual schedule)
    train_loss: float  # mean over the epoch's texts, measured while training
    train_accuracy: float  # likewise
    validation_loss: float
    validation_accuracy: float


@dataclass
class Training:
    """What fine-tuning produced: the history, and the weights of the best epoch (by validation
    accuracy, then loss)."""

    cache: fastpath.CacheStatus  # as in the last epoch
    best_state: dict[str, torch.Tensor]
    history: list[EpochRecord] = field(default_factory=list)
    step_checks: list[dict] = field(default_factory=list)  # validation loss every --eval-every steps
    epoch_seconds: list[float] = field(default_factory=list)
    best_epoch: int = 0
    cache_seconds: float = 0.0  # building the cache, every (re)build

    def __post_init__(self) -> None:
        self.cache_seconds += self.cache.seconds

    def set_cache(self, cache: fastpath.CacheStatus) -> None:
        self.cache, self.cache_seconds = cache, self.cache_seconds + cache.seconds

    def add_epoch(self, record: EpochRecord, seconds: float) -> bool:
        """Record an epoch; True when it is the best so far."""
        if not math.isfinite(record.validation_loss):
            raise ValueError(f"the validation loss became {record.validation_loss} in epoch {record.epoch}: "
                             "training diverged (try a lower --lr); no run folder was written")
        self.history.append(record)
        self.epoch_seconds.append(seconds)
        best = max(self.history, key=lambda r: (r.validation_accuracy, -r.validation_loss))  # first of equals
        self.best_epoch = best.epoch
        return best is record


@dataclass
class Tally:
    """Loss and right answers summed over an epoch's texts; under torchrun, read over every process."""

    device: torch.device
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor]
    loss: torch.Tensor = field(init=False)
    correct: torch.Tensor = field(init=False)
    texts: int = 0  # the whole batches', on every process

    def __post_init__(self) -> None:
        self.loss = torch.zeros((), device=self.device)  # summed on the device: no sync per step
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, batch: fastpath.Batch) -> None:
        self.loss += loss.detach() * batch.size  # this process's texts' summed loss
        self.correct += (logits.argmax(dim=-1) == batch.labels).sum()
        self.texts += batch.size

    def mean_loss(self) -> float:
        """The mean so far; ValueError when it stopped being finite: a diverged run stops, and no
        model of NaNs is saved as if it had trained."""
        loss = self.sum_over_processes(self.loss).item() / self.texts
        if not math.isfinite(loss):
            raise ValueError(f"the training loss became {loss} after {self.texts} texts: training diverged "
                             "(try a lower --lr, or --lora-alpha for lora); no run folder was written")
        return loss

    def accuracy(self) -> float:
        return self.sum_over_processes(self.correct).item() / self.texts


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
        minutes, seconds = divmod(round(elapsed / self.step * (self.total_steps - self.step)), 60)
        return (f"epoch {epoch + 1}/{epochs}  step {step_in_epoch}/{steps_per_epoch}  "
                f"{self.examples / elapsed:,.0f} examples/s  loss {loss:.4f}  "
                f"time left {minutes // 60}:{minutes % 60:02d}:{seconds:02d}")


def epoch_line(record: EpochRecord, epochs: int, training: Training) -> str:
    return (f"epoch {record.epoch}/{epochs} done in {training.epoch_seconds[-1]:.1f} s: "
            f"train loss {record.train_loss:.4f} accuracy {record.train_accuracy:.2%}  |  "
            f"validation loss {record.validation_loss:.4f} accuracy {record.validation_accuracy:.2%}"
            + ("  (best so far)" if training.best_epoch == record.epoch else ""))


@dataclass
class RunResult:
    strategy: str
    reports: dict[str, metrics.ClassificationReport]
    losses: dict[str, float]
    parameters: dict[str, float]
    training: Training
    training_seconds: float
    seed: int | None = None  # the training seed
    test_predictions: list[int] = field(default_factory=list)  # text by text, in the test split's order


def describe_trainable(model: classify.GPTClassifier) -> str:
    """What trains, in words: 'head + final LayerNorm + blocks 10-11'."""
    adapters = {id(p) for m in model.modules() if isinstance(m, classify.LoRALinear) for p in (m.lora_A, m.lora_B)}
    blocks = [i for i, block in enumerate(model.gpt.h)
              if any(p.requires_grad and id(p) not in adapters for p in block.parameters())]
    parts = [name for name, module in (("head", model.head), ("final LayerNorm", model.gpt.ln_f))
             if classify.trains(module)]
    if blocks:
        parts.append(f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}")
    if adapters:
        parts.append(f"LoRA adapters in blocks 0-{len(model.gpt.h) - 1}")
    if classify.trains(model.gpt.wte) or classify.trains(model.gpt.wpe):
        parts.append("embeddings")
    return " + ".join(parts) or "nothing"


def parameter_counts(model: nn.Module) -> dict[str, float]:
    trainable, total = classify.count_parameters(model)
    return {"trainable": trainable, "total": total, "share": trainable / total}


# --------------------------------------------------------------------------- the log


def describe_steps(cfg, splits, tokens, gpt_model: nn.Module, runtime: distributed.Runtime) -> str:
    """Steps 1-7 in one line each, as the run sets them up."""
    counts = " / ".join(f"{name} {len(dataset):,}" for name, dataset in tokens.items())
    truncated = sum(dataset.num_truncated for _, dataset in tokens.items())
    batch = f"batch size {cfg.batch_size}"
    if runtime.distributed:
        batch += (f" (the global batch: texts per weight update, shared by {runtime.world_size} processes, "
                  f"about {cfg.batch_size / runtime.world_size:g} each)")
    torchrun = (f"torchrun: {runtime.world_size} processes train together ({torch.distributed.get_backend()}, "
                f"DistributedDataParallel), rank 0 on {runtime.device}\n" if runtime.distributed else "")
    return (f"{torchrun}1. labelled text: {cfg.data or 'SMS Spam Collection'} "
            f"({'balanced' if cfg.balanced else 'all data'}): {counts}; classes {', '.join(splits.label_names)}\n"
            f"2. tokenization: GPT-2 BPE, max_length {tokens.max_length} tokens, "
            f"{truncated} text{'s' if truncated != 1 else ''} cut to fit\n"
            f"3. GPT: {cfg.model}, {cfg.init} weights, {sum(p.numel() for p in gpt_model.parameters()):,} "
            f"parameters, on {runtime.device}\n"
            f"4. representation: pooling {cfg.pooling!r}; 5. classification head: "
            f"Linear({gpt_model.cfg.emb_dim} -> {len(splits.label_names)})\n"
            f"6. supervised loss: cross-entropy; 7. weight update: AdamW lr {cfg.lr:g}, weight decay "
            f"{cfg.weight_decay:g}, {batch}, {cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''}"
            + (f"; training seeds {', '.join(map(str, cfg.seeds))} (the split"
               f"{' and the random GPT' if cfg.init == 'random' else ''}: seed {cfg.seed})" if cfg.seeds else ""))


def describe_strategy(model: classify.GPTClassifier, strategy: str, epochs: int, seed: int | None = None) -> str:
    parameters = parameter_counts(model)
    line = (f"strategy {strategy}{'' if seed is None else f', training seed {seed}'}: training "
            f"{describe_trainable(model)}: {parameters['trainable']:,} of "
            f"{parameters['total']:,} parameters ({parameters['share']:.2%})")
    if strategy != "gradual":
        return line
    n_layers = len(model.gpt.h)
    counts = [classify.trainable_blocks("gradual", n_layers, epoch) for epoch in range(epochs)]
    return line + "\ngradual schedule: " + "; ".join(
        f"epoch {epoch + 1}: head + final LayerNorm" + (f" + top {n} block{'s' if n > 1 else ''}" if n else "")
        for epoch, n in enumerate(counts))


def describe_result(result: RunResult, tokens) -> str:
    """The chapter's evaluation for every split, then what the training cost."""
    parts = [f"\n{name} ({len(getattr(tokens, name)):,} texts), loss {result.losses[name]:.4f}\n"
             + metrics.format_report(report) for name, report in result.reports.items()]
    parameters = result.parameters
    parts.append(f"{result.strategy}: trained in {result.training_seconds:.1f} s; trainable parameters "
                 f"{parameters['trainable']:,} of {parameters['total']:,} ({parameters['share']:.2%})")
    return "\n".join(parts)


# --------------------------------------------------------------------------- the run folder


@dataclass
class RunFacts:
    """What metrics.json records besides the results: how the run was asked for and set up."""

    cfg: object  # train.TrainConfig
    argv: list[str]
    tokens: object  # train.TokenizedSplits
    gpt_config: object  # gpt.GPTConfig
    runtime: distributed.Runtime
    started: float
    training_seed: int | None = None  # with --seeds: this run's (the split's seed stays cfg.seed)


COMPARISON_SETTINGS = ("seeds", "reference")  # compare.json's; one run's metrics.json records its own seed


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
        "seed": facts.cfg.seed,
        **({} if facts.training_seed is None else {"training_seed": facts.training_seed}),
        "arguments": {"argv": facts.argv, "config": {key: value for key, value in asdict(facts.cfg).items()
                                                     if key not in COMPARISON_SETTINGS}},
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
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def write_run(run_dir: Path, final_dir: Path, result: RunResult, facts: RunFacts, log: Log) -> None:
    """metrics.json, and the plots with --plot, in `run_dir` (the folder being built, which
    becomes `final_dir`)."""
    seeded = replace(facts, training_seed=result.seed if facts.cfg.seeds else None)
    write_json(run_dir / "metrics.json", metrics_document(result, seeded))
    if facts.cfg.plot:
        log(write_plots(result, run_dir, final_dir))


def write_plots(result: RunResult, folder: Path, final_folder: Path) -> str:
    """Loss and accuracy curves and the confusion matrices as PNG in `folder` (the run folder
    being built, which becomes `final_folder`); matplotlib is optional, and a plot that fails
    is a note, never the end of a finished run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return "--plot: matplotlib is not installed, no plots written (pip install matplotlib)"
    try:
        _plot(result, folder, plt, MaxNLocator)
    except Exception as error:  # noqa: BLE001 - matplotlib's failures are many; the run is what matters
        return f"--plot: no plots written ({type(error).__name__}: {one_line(error)})"
    return f"plots written: loss.png, accuracy.png, confusion_matrix_*.png in {final_folder}"


def _plot(result: RunResult, folder: Path, plt, MaxNLocator) -> None:  # noqa: N803 - matplotlib's class
    epochs = [record.epoch for record in result.training.history]
    for quantity in ("loss", "accuracy"):
        figure, axes = plt.subplots(figsize=(5, 3.5))
        for split in ("train", "validation"):
            axes.plot(epochs, [getattr(r, f"{split}_{quantity}") for r in result.training.history], marker="o",
                      label=split)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.set(xlabel="epoch", ylabel=quantity)
        axes.legend()
        figure.tight_layout()
        figure.savefig(folder / f"{quantity}.png", dpi=120)
        plt.close(figure)
    for split, report in result.reports.items():
        figure, axes = plt.subplots(figsize=(4, 3.5))
        axes.imshow(report.confusion_matrix, cmap="Blues", vmin=0)
        names, darkest = report.label_names, max(max(row) for row in report.confusion_matrix)
        axes.set_xticks(range(len(names)), names)
        axes.set_yticks(range(len(names)), names)
        axes.set(xlabel="predicted", ylabel="true", title=f"{split}: accuracy {report.accuracy:.2%}")
        for i, row in enumerate(report.confusion_matrix):
            for j, count in enumerate(row):  # white on the dark cells, black on the light ones
                axes.text(j, i, f"{count:,}", ha="center", va="center",
                          color="white" if count > darkest / 2 else "black")
        figure.tight_layout()
        figure.savefig(folder / f"confusion_matrix_{split}.png", dpi=120)
        plt.close(figure)


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


@contextlib.contextmanager
def staged_output(out: Path, runtime: distributed.Runtime) -> Iterator[Path | None]:
    """The run folder being built, on rank 0 alone (None on the other processes, which write
    nothing); every process learns whether rank 0 could create it before any work starts."""
    with contextlib.ExitStack() as stack:
        create = (lambda: stack.enter_context(hub.staged_folder(out, "--out"))) if runtime.is_main_process else None
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
        raise ValueError(f"cannot read {source}: {' '.join(str(error).split())}") from None
    if content.count("\n") > MAX_TEXTS:
        raise ValueError(f"cannot read {source}: more than {MAX_TEXTS:,} lines; classify it in parts")
    lines = content.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.removesuffix("\r") for line in lines]


def shorten(text: str, width: int = 70) -> str:
    text = hub.printable(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"


def classify_command(argv: list[str] | None = None) -> int:
    """`python classify.py --model RUN_DIR "text" ...`: returns the exit code (0, or 2 with one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="classify.py", description="Classify texts with a fine-tuned GPT-2 classifier saved by train.py.",
        epilog="An empty text is classified as the single token <|endoftext|> (the model's view of 'no text'). "
        "A text longer than the run's max_length keeps its first max_length tokens, as in training. "
        "Messages per second are reported on stderr.")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="folder written by train.py or transformers")
    parser.add_argument("--export-hf", metavar="OUT_DIR", help="instead, write it as a transformers classifier folder")
    parser.add_argument("--file", metavar="F", help="read one text per line from F ('-' for stdin)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {text, label, probabilities}")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (default 32)")
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
        if args.export_hf:  # machinery: hfformat.py writes transformers' layout
            model, config = classify.load_classifier(args.model)
            print(hfformat.export_classifier(classify.classifier_tensors(model), config.gpt, config.label_names,
                                             config.pooling, config.max_length, args.export_hf).describe())
            return 0
        texts = list(args.texts) + (read_texts(args.file) if args.file else [])
        if not texts and not args.serve:
            raise ValueError("nothing to classify: give texts as arguments or --file F ('-' for stdin)")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be at least 1")
        device = distributed.pick_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, config = classify.load_classifier(args.model, device)
        if args.serve:  # machinery: serve.py answers HTTP with classify.predict (docs/serving.md)
            return serve.run(lambda batch: [asdict(p) for p in classify.predict(model, config, batch, args.batch_size)],
                             serve.model_facts(args.model, config.label_names, config.max_length), args.host, args.port)
        start = time.perf_counter()
        predictions = classify.predict(model, config, texts, args.batch_size)
        seconds = time.perf_counter() - start
    except ValueError as error:
        print(f"classify.py: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("classify.py: interrupted", file=sys.stderr)
        return 130
    if hasattr(sys.stdout, "reconfigure"):  # an emoji to an ASCII-only terminal: \U0001f600, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    if args.json:  # JSON escapes C0 controls itself (its own newlines stay); the rest as \uXXXX, still valid JSON
        document = json.dumps([asdict(p) for p in predictions], ensure_ascii=False, indent=2)
        print(hub.UNPRINTABLE.sub(lambda m: m.group() if m.group() < " " else f"\\u{ord(m.group()):04x}", document))
    else:
        for p in predictions:
            probabilities = " ".join(f"{shorten(name, 30)}={value:.3f}" for name, value in p.probabilities.items())
            print(f"{shorten(p.label, 30)}\t{probabilities}\t{shorten(p.text)}")
    print(f"{len(texts)} texts in {seconds:.2f} s: {len(texts) / max(seconds, 1e-9):.1f} messages/s on {device}",
          file=sys.stderr)
    return 0
