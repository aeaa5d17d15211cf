"""The main job as a command: machinery around train.pipeline that the chapter never mentions.

`python train.py ...` reads its flags into a `train.TrainConfig` and checks them before any work
(`check_config`); then `run` joins the other processes under torchrun (distributed.py), has rank
0 download what is missing while the others wait, builds the run folder aside so that it appears
only when complete (report.staged_output), hands the pipeline a `Job` (where to compute, where to
tell, where to save), and, for several runs, writes compare.json and the table (comparison.py).
`main` turns every error a user can cause into one line on stderr and exit code 2.

train.py calls `main(argv, TrainConfig, pipeline)`: this module never imports train.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import classify
import comparison
import data
import datafiles
import distributed
import evaluation
import fastpath
import gpt
import hub
import report
import runfiles


@dataclass
class Job:
    """What the pipeline needs besides its settings, handed in by `run`. Under torchrun only rank 0
    prints and saves: the other processes keep the quiet defaults."""

    cfg: object  # train.TrainConfig
    runtime: distributed.Runtime
    gpt_config: gpt.GPTConfig | None = None  # the model's shape, read once when the arguments were checked
    text_tokens: int = 0  # the most tokens of a text the classifier reads (classify.longest_text)
    precision: torch.dtype = torch.float32  # what autocast computes in (distributed.pick_precision)
    log: report.Log = report.quiet  # lines that stay
    progress: report.Log = report.quiet  # lines the next replaces, on a terminal
    detail: report.Log = report.quiet  # a run's own lines: `log` for one run, `progress` in a comparison
    save: Callable[..., None] = lambda *run: None  # (model, result, tokens, splits): a finished run
    frozen_work: fastpath.SharedPrefix | None = None  # set by the pipeline, read for compare.json

    @property
    def eval_batch_size(self) -> int:
        return max(self.cfg.batch_size, 32)  # no gradients kept: larger batches cost little memory


def fetch_files(cfg) -> None:
    """Download what the pipeline will read, once, into the cache: the SMS Spam Collection (no
    --data) and a preset's weights (--init pretrained)."""
    if cfg.data is None:
        hub.download_sms_spam(cfg.cache_dir, hub.print_progress)
    if cfg.init == "pretrained":
        hub.fetch(cfg.model, cfg.cache_dir, hub.print_progress)


def run(cfg, argv: list[str], console: report.Console, pipeline: Callable[..., list]) -> int:
    """`pipeline(cfg, job)` inside the machinery this module's docstring lists, in that order; the
    end says how to use the result."""
    started = time.perf_counter()
    gpt_config = check_config(cfg)
    comparing = bool(cfg.compare) or len(cfg.seeds) > 1  # one folder per run, compare.json beside them
    with distributed.session(cfg.device) as runtime:
        precision = distributed.pick_precision(cfg.precision, runtime.device)
        job = Job(cfg, runtime, gpt_config, classify.longest_text(gpt_config, cfg.pooling), precision)
        if runtime.is_main_process:  # the other processes under torchrun stay quiet
            job.log, job.progress = console.line, console.progress
            job.detail = console.progress if comparing else console.line
        out = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        folders, example, base = [], [], {}
        classifiers: list[tuple[float, Path]] = []  # (validation accuracy, folder): what classify.py loads
        with report.staged_output(out, runtime, finished=lambda: bool(folders)) as staging:  # rank 0's; else None
            distributed.load_in_turn(runtime, lambda: fetch_files(cfg))

            def save(model: classify.GPTClassifier, result, tokens, splits: data.Splits) -> None:
                folder = report.run_folder(result.strategy, result.seed, comparing, several_seeds=len(cfg.seeds) > 1)
                (staging / folder).mkdir(parents=True, exist_ok=True)
                if model is not None:  # None: a baseline, which classify.py could not load
                    if cfg.save == "trained" and cfg.init == "pretrained" and not base:  # once for every run
                        base.update(runfiles.weights_identity(cfg.model, cfg.cache_dir))
                    classify.save_classifier(model.cpu(), staging / folder, splits.label_names, tokens.max_length,
                                             base or None)
                    classifiers.append((result.reports["validation"].accuracy, out / folder))
                evaluation.write_mistakes(staging / folder / "mistakes.tsv", result, tokens)
                facts = report.RunFacts(cfg, argv, tokens, gpt_config, runtime, precision, started)
                report.write_json(staging / folder / "metrics.json", report.metrics_document(result, facts))
                folders.append(out / folder)  # finished: kept even if what follows is interrupted
                if cfg.plot:
                    job.log(report.write_plots(result, staging / folder, out / folder, cfg))
                example[:] = [report.example_text(splits.test, cfg.data is None)]

            if staging is not None:  # rank 0 writes the classifier (for classify.py), metrics.json, plots
                job.save = save
            try:
                results = pipeline(cfg, job)
            except BaseException as error:  # what finished before is kept (report.staged_output): say where
                runs = f"{len(folders)} finished run{'s' if len(folders) > 1 else ''}"
                error.kept = f"{runs} kept in {out}" if folders else ""
                raise
            if comparing and staging is not None:
                strategies = cfg.compare or [cfg.strategy]
                experiment = comparison.Experiment(strategies, cfg.seeds or [cfg.seed],
                                                   comparison.reference_strategy(cfg.reference, strategies),
                                                   results[0].test_labels, job.frozen_work,
                                                   time.perf_counter() - started)
                job.log(comparison.write_comparison(staging, out, results, experiment, cfg, argv))
        if staging is not None:
            latest = report.point_latest(out) if cfg.out is None else None
            best = max(classifiers, key=lambda kept: kept[0])[1] if classifiers else None  # the first of equals
            job.log(report.describe_end(out, folders, latest, best, example[0], time.perf_counter() - started))
    return 0


# --------------------------------------------------------------------------- the command line


def build_parser(defaults) -> argparse.ArgumentParser:
    """train.py's flags, in the pipeline's order; `defaults`: a train.TrainConfig()."""
    parser = argparse.ArgumentParser(
        prog="train.py", description="Fine-tune GPT-2 for text classification (chapter 06 of 'Fazendo um LLM do "
        "Zero'). With no arguments: the book's experiment (pretrained gpt2-small, SMS spam, last block, 5 epochs).")
    group = parser.add_argument_group("1. labelled text")
    group.add_argument("--data", metavar="PATH", help="training data: a file in the SMS Spam Collection's format "
                       "(label<TAB>text), or a CSV/TSV with a header. Default: download the SMS Spam Collection "
                       "once (then cached)")
    group.add_argument("--validation-data", metavar="PATH",
                       help="a separate validation file (with --test-data); default: split --data 70/10/20")
    group.add_argument("--test-data", metavar="PATH", help="a separate test file (with --validation-data)")
    group.add_argument("--text-column", default=defaults.text_column, metavar="NAME",
                       help="CSV/TSV column holding the text (default: %(default)s)")
    group.add_argument("--label-column", default=defaults.label_column, metavar="NAME",
                       help="CSV/TSV column holding the class (default: %(default)s)")
    group.add_argument("--delimiter", metavar="CHAR", help="the CSV/TSV delimiter: , ; | or tab (default: the one "
                       "that splits the header into the named columns)")
    group.add_argument("--encoding", default=defaults.encoding, metavar="NAME", help="the files' text encoding, "
                       "e.g. cp1252 or latin-1 for files saved by Excel on Windows (default: %(default)s)")
    group.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=defaults.balanced,
                       help="undersample every class to the smallest one, as the book does (SMS: 1,045/149/300; "
                       "the default); --no-balanced keeps all the data and splits it stratified")
    group.add_argument("--dedup", action="store_true", help="drop repeated texts before balancing and splitting, "
                       "so that no text is in two splits (duplicates: the same text after Unicode NFC normalisation "
                       "and stripping surrounding whitespace; the first is kept). Default: keep them, as the book "
                       "does; every run counts them and scores the test texts not seen in training apart")
    group = parser.add_argument_group("2. tokenization")
    group.add_argument("--max-length", type=int, metavar="TOKENS", help="cut texts to this many tokens; default: "
                       "the longest training text, at most the model's context length")
    group = parser.add_argument_group("3. GPT")
    group.add_argument("--model", default=defaults.model, metavar="NAME_OR_PATH", help=f"a preset "
                       f"({', '.join(gpt.PRESETS)}), a Hugging Face folder or a .safetensors file "
                       "(default: %(default)s)")
    group.add_argument("--init", default=defaults.init, choices=("pretrained", "random"),
                       help="'random': the same architecture with random weights (what does pretraining buy? "
                       "also runs offline; default: %(default)s)")
    group.add_argument("--cache-dir", metavar="DIR", help="where downloads are kept "
                       "(default: $GPT2_CLASSIFICATION_CACHE or ~/.cache/gpt2-classification)")
    group = parser.add_argument_group("4-5. representation and classification head")
    group.add_argument("--pooling", default=defaults.pooling, metavar="{" + ",".join(classify.POOLINGS) + "}",
                       help="which vector represents the text: 'last' real token, the only one that has seen the "
                       "whole text; 'mean' of the tokens; 'special', an <|endoftext|> appended to each text; "
                       "'first', for contrast (default: %(default)s)")
    group.add_argument("--strategy", default=defaults.strategy, metavar="NAME", help="what is trained: head, "
                       "last-block, last-N-blocks (e.g. last-2-blocks), all, gradual (one more block unfrozen per "
                       "epoch), lora (default: %(default)s)")
    group.add_argument("--lora-rank", type=int, default=defaults.lora_rank, metavar="R",
                       help="rank of the LoRA adapters (default: %(default)s)")
    group.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, metavar="ALPHA",
                       help="the LoRA update is scaled by alpha / rank (default: %(default)s)")
    group = parser.add_argument_group("6-7. supervised loss and weight update")
    group.add_argument("--epochs", type=int, default=defaults.epochs, metavar="N",
                       help="passes over the training data (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                       help="texts per weight update (default: %(default)s)")
    group.add_argument("--accumulation-steps", type=int, default=defaults.accumulation_steps, metavar="N",
                       help="compute each update in N smaller micro-batches (less GPU memory, the same update; "
                       "default: %(default)s)")
    group.add_argument("--lr", type=float, default=defaults.lr, metavar="RATE",
                       help="AdamW learning rate (default: %(default)s)")
    group.add_argument("--schedule", default=defaults.schedule, choices=("constant", "linear", "cosine"),
                       help="the learning rate over the run: constant (the book's) or a decay to 0 (default: "
                       "%(default)s)")
    group.add_argument("--warmup", type=int, default=defaults.warmup, metavar="STEPS",
                       help="updates whose learning rate rises linearly to --lr (default: %(default)s)")
    group.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, metavar="NORM",
                       help="clip the gradient to this norm before each update (default: no clipping)")
    group.add_argument("--class-weights", default=defaults.class_weights, choices=("none", "balanced"),
                       help="'balanced': weight the training loss by inverse class frequency, n / (classes x "
                       "count), for imbalanced data (--no-balanced); evaluation losses stay unweighted "
                       "(default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, metavar="W",
                       help="AdamW weight decay (default: %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, metavar="N",
                       help="one seed for the split, the new weights, the batch order and (with --init random) "
                       "the random GPT (default: %(default)s)")
    group.add_argument("--eval-every", type=int, default=defaults.eval_every, metavar="STEPS",
                       help="also print the validation loss every this many steps (default 0: only after each epoch)")
    group = parser.add_argument_group("running and output")
    group.add_argument("--precision", default=defaults.precision, choices=("auto", *distributed.PRECISIONS),
                       help="what the forward passes compute in: auto picks bf16 on GPUs with bfloat16 hardware "
                       "(compute capability 8.0+), fp16 on 7.x cards (T4, V100), fp32 elsewhere (default: %(default)s)")
    group.add_argument("--device", default=defaults.device, metavar="NAME",
                       help="auto (the default: cuda, then mps, then cpu), cuda, mps or cpu")
    group.add_argument("--out", metavar="DIR", help="where the run is written (classifier.safetensors, "
                       "config.json, metrics.json, mistakes.tsv); default: runs/<timestamp>")
    group.add_argument("--save", default=defaults.save, choices=("trained", "full"), help="what a run folder holds: "
                       "the trained weights alone, beside the identity (sha256) of the starting weights they "
                       "complete, found again when loading (the default; runs from random weights are always whole), "
                       "or every weight (full: a folder that needs nothing else, ~500 MB for gpt2-small)")
    group.add_argument("--plot", action="store_true",
                       help="also write loss/accuracy curves and confusion matrices as PNG (needs matplotlib)")
    group.add_argument("--compare", default="", metavar="STRATEGY,STRATEGY,...", help="train each listed strategy "
                       "from the same starting weights and data, then print one table (e.g. head,last-block,all); "
                       "the frozen blocks' work is done once for all of them. Baselines without GPT-2 can be rows "
                       "too: majority (the training majority class) and bag-of-words (logistic regression over "
                       "GPT-2 token counts)")
    group.add_argument("--seeds", default="1", metavar="N|SEED,SEED,...", help="train each strategy N times, with "
                       "the training seeds --seed, --seed+1, ... (or with the seeds listed; '7,' is a list of one), "
                       "and report mean, std, min and max. A training seed sets the new head's initial weights, the "
                       "batch order and LoRA's initial adapters; the split and, with --init random, the random GPT "
                       "stay fixed by --seed, so the spread is the training's alone (default: 1, a single run)")
    group.add_argument("--reference", metavar="STRATEGY", help="with --compare: test every strategy against this "
                       "one, text by text on the test set (McNemar's exact test, per seed pair); default: last-block "
                       "when compared, else the first strategy")
    group.add_argument("--compile", action="store_true", help="torch.compile the blocks (CUDA only)")
    group.add_argument("--no-cache", dest="use_prefix_cache", action="store_false",
                       help="do not cache the frozen blocks' outputs (slower, same result: for comparison)")
    return parser


def config_from_args(args: argparse.Namespace, config_class: type):
    values = vars(args).copy()
    values["compare"] = [name.strip() for name in args.compare.split(",") if name.strip()]
    if args.compare.strip() and not values["compare"]:
        raise ValueError(f"--compare {evaluation.shorten(args.compare, 60)}: no strategy named (e.g. head,last-block)")
    values["seeds"] = comparison.parse_seeds(args.seeds, args.seed)
    return config_class(**values)


def check_config(cfg) -> gpt.GPTConfig:
    """Reject bad arguments before anything is downloaded or trained; returns the model's shape."""
    gpt_config = gpt.load_config(cfg.model)  # ValueError on an unknown name or bad path
    if gpt_config.vocab_size <= data.END_OF_TEXT_ID:
        raise ValueError(f"--model {cfg.model}: {gpt_config.vocab_size} tokens, fewer than GPT-2's tokenizer needs "
                         f"({data.END_OF_TEXT_ID + 1})")
    if cfg.strategy in evaluation.BASELINES and not cfg.compare:
        raise ValueError(f"--strategy {cfg.strategy}: a baseline, not a way to fine-tune; compare it with one: "
                         f"--compare {cfg.strategy},last-block")
    if cfg.compare and all(name in evaluation.BASELINES for name in cfg.compare):
        raise ValueError(f"--compare {','.join(cfg.compare)}: baselines alone; add a strategy they are measured "
                         f"against, e.g. --compare {','.join(cfg.compare)},last-block")
    for name in cfg.compare or [cfg.strategy]:
        if name not in evaluation.BASELINES:  # ValueError: unknown, or more blocks than the model has
            classify.trainable_blocks(name, gpt_config.n_layers)
    seen: dict[tuple[str, int], str] = {}  # what a name trains -> its first name: last-1-blocks is last-block
    for name in cfg.compare:
        strategy = classify.parse_strategy(name) if name not in evaluation.BASELINES else None
        meaning = (strategy.kind, strategy.num_blocks) if strategy else (name, 0)
        if meaning in seen:
            first = seen[meaning]
            twice = "is listed twice" if first == name else f"trains what {gpt.quoted(first, 40)} trains"
            raise ValueError(f"--compare: {gpt.quoted(name, 40)} {twice} (use --seeds to repeat a strategy)")
        seen[meaning] = name
    if cfg.reference is not None and cfg.reference not in (cfg.compare or [cfg.strategy]):
        raise ValueError(f"--reference {cfg.reference}: not among the strategies compared "
                         f"({', '.join(cfg.compare or [cfg.strategy])})")
    width = gpt_config.emb_dim
    parameters = (gpt_config.vocab_size + gpt_config.context_length) * width + gpt_config.n_layers * 12 * width**2
    if cfg.init == "random" and parameters * 4 > distributed.memory_bytes():  # before building what cannot fit
        raise ValueError(f"--model {cfg.model}: about {parameters:,} parameters, {parameters * 4 / 2**30:,.0f} GiB "
                         f"in float32, more than this machine's {distributed.memory_bytes() / 2**30:,.0f} GiB")
    if cfg.pooling not in classify.POOLINGS:
        raise ValueError(f"unknown pooling {cfg.pooling!r}; choose one of {', '.join(classify.POOLINGS)}")
    lora = "lora" in (cfg.compare or [cfg.strategy])
    for flag, value, ok, requirement in (
        ("--epochs", cfg.epochs, cfg.epochs >= 1, "at least 1"),
        ("--batch-size", cfg.batch_size, cfg.batch_size >= 1, "at least 1"),
        ("--accumulation-steps", cfg.accumulation_steps, 1 <= cfg.accumulation_steps <= cfg.batch_size,
         f"between 1 and --batch-size ({cfg.batch_size})"),
        ("--warmup", cfg.warmup, cfg.warmup >= 0, "0 or more"),
        ("--max-grad-norm", cfg.max_grad_norm, cfg.max_grad_norm is None or 0 < cfg.max_grad_norm < math.inf,
         "a finite number greater than 0"),
        ("--eval-every", cfg.eval_every, cfg.eval_every >= 0, "0 or more"),
        ("--lr", cfg.lr, 0 < cfg.lr < math.inf, "a finite number greater than 0"),
        ("--weight-decay", cfg.weight_decay, 0 <= cfg.weight_decay < math.inf, "a finite number, 0 or more"),
        ("--lora-rank", cfg.lora_rank, not lora or 1 <= cfg.lora_rank <= gpt_config.emb_dim,
         f"between 1 and the model's width, {gpt_config.emb_dim}"),
        ("--lora-alpha", cfg.lora_alpha, not lora or math.isfinite(cfg.lora_alpha), "a finite number"),
        ("--seed", cfg.seed, 0 <= cfg.seed < 2**63, "in 0..2**63-1"),
        ("--class-weights", cfg.class_weights, cfg.class_weights in ("none", "balanced"), "none or balanced"),
    ):
        if not ok:
            raise ValueError(f"{flag} {value}: must be {requirement}")
    if cfg.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or pip install -e \".[plot]\")")
    datafiles.check_delimiter(cfg.delimiter)  # ValueError naming --delimiter
    datafiles.check_encoding(cfg.encoding)  # ValueError naming --encoding
    if (cfg.validation_data is None) != (cfg.test_data is None):
        raise ValueError("give both --validation-data and --test-data, or neither (to split --data 70/10/20)")
    for flag, path in (("--data", cfg.data), ("--validation-data", cfg.validation_data),
                       ("--test-data", cfg.test_data)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    longest = classify.longest_text(gpt_config, cfg.pooling)
    if cfg.max_length is not None and not 1 <= cfg.max_length <= longest:
        raise ValueError(f"--max-length {cfg.max_length}: must be between 1 and {longest}, what the model reads "
                         f"(its context length{', less the special token' if cfg.pooling == 'special' else ''})")
    if cfg.init == "pretrained" and Path(cfg.model).is_dir() and not any(
            (Path(cfg.model) / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(f"--model {cfg.model}: no model.safetensors there (for its architecture alone: --init random)")
    distributed.pick_precision(cfg.precision, distributed.pick_device(cfg.device))  # unknown, absent or unable
    return gpt_config


OFFLINE_HINT = ("offline, use local files: --data PATH (the SMS Spam Collection file or your CSV), --model PATH "
                "(a Hugging Face folder or a .safetensors file), or --init random (no weights needed)")


def main(argv: list[str] | None, config_class: type, pipeline: Callable[..., list]) -> int:
    """`python train.py ARGS`: read and check the flags into a `config_class` (train.TrainConfig),
    run `pipeline` (train.pipeline), and turn every failure a user can cause into one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(config_class()).parse_args(argv)
    label = distributed.process_label()  # '[rank 1] ' under torchrun: every process reports its own failure
    if hasattr(sys.stdout, "reconfigure"):  # class names a terminal cannot show: escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        with report.sigterm_as_ctrl_c():
            return run(config_from_args(args, config_class), argv, report.Console(), pipeline)
    except BrokenPipeError:  # the output went to a pipe that closed (`| head`): stop quietly
        return hub.quiet_closed_stdout()
    except ConnectionError as error:
        print(f"{label}error: {report.one_line(error)}; {OFFLINE_HINT}", file=sys.stderr)
    except (ValueError, OSError) as error:
        kept = f" ({error.kept})" if getattr(error, "kept", "") else ""
        print(f"{label}error: {report.one_line(error)}{kept}", file=sys.stderr)
    except KeyboardInterrupt as error:
        print(f"{label}interrupted: {getattr(error, 'kept', '') or 'no run folder was written'}", file=sys.stderr)
        return 130
    except (distributed.OtherProcessFailed, distributed.StoppedByTorchrun) as error:
        if label == "[rank 0] ":  # another process failed and said why; rank 0 says that this one stopped
            print(f"{label}{report.one_line(error)}", file=sys.stderr)
    except Exception as error:
        if report.out_of_memory(error):
            print(f"{label}error: out of memory (try a smaller --batch-size, --max-length or --model); "
                  "no run folder was written", file=sys.stderr)  # torch's allocator raises a RuntimeError
            return 2
        if label:  # a bug on one process: name it, then the traceback
            print(f"{label}error: {type(error).__name__}: {report.one_line(error)}", file=sys.stderr, flush=True)
        raise
    return 2

