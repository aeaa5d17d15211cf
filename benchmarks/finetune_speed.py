"""How much faster is our fine-tuning than the book's method, for the same result?

The book's method (its chapter 6 code) pads every text to the longest training text, runs the
whole network on every position at every step, and applies the head to every position. Ours
(train.py, classify.GPTClassifier.forward) stores what the frozen blocks compute once, pads each
batch only to its own longest text, and runs the last block only where the head reads. Both runs share
everything else: data, split, seed, initial weights, batch order, optimizer, per-epoch
validation, best-epoch choice and final evaluation, so their test accuracies agree up to
rounding and the time ratio is the price of the method alone.

Each (strategy, method) pair runs in its own process, so its peak memory is its own.

    python benchmarks/finetune_speed.py --data ../shared/data/sms_spam/SMSSpamCollection
    python benchmarks/finetune_speed.py --strategies last-block --epochs 5 --json speed.json

Never run by CI: on a 2-core CPU it takes about 12 minutes for last-block and 33 for all.

--gpu-check (what benchmarks/gpu.sh runs) is the GPU check: the default job with --init random,
then our method for last-block and all, each without and with --compile, every one a whole
process timed from its start to its exit, into one JSON. --dry-run makes it a check of the
script on any machine (a 2-block model, 1 epoch): it measures nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # torch warns at import when NumPy is missing; run from anywhere
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time

import torch
from torch.nn import functional as F

import classify
import data
import distributed
import fastpath
import report
import runner
import train

METHODS = ("book", "ours")


class BookClassifier(classify.GPTClassifier):
    """The book's compute: every text padded to `pad_to` tokens, every block on every position,
    the head on every position; then the logits of each text's last real token are read (the
    same representation as ours, so both methods learn the same function)."""

    pad_to: int = 0

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor, start_block: int = 0) -> torch.Tensor:
        assert start_block == 0, "the book's method stores nothing (--no-cache)"
        token_ids = F.pad(token_ids, (0, self.pad_to - token_ids.shape[1]), value=data.PAD_TOKEN_ID)  # (B, pad_to)
        hidden = self.gpt.hidden_states(token_ids)  # (B, pad_to, C): the whole network, every position
        logits = self.head(hidden)  # (B, pad_to, K): the book's out_head runs on every position too
        return logits[torch.arange(len(lengths)), lengths - 1]  # (B, K)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_one(method: str, strategy: str, args: argparse.Namespace) -> dict:
    """One fine-tuning run, in this process, timed from loading the data to the final metrics."""
    started = time.perf_counter()
    cfg = train.TrainConfig(
        data=args.data, model=args.model, init="random", strategy=strategy, epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, device=args.device,
        use_prefix_cache=method == "ours", compile=args.compile,
    )
    gpt_config = runner.check_config(cfg)
    device = distributed.pick_device(cfg.device)
    job = runner.Job(cfg, distributed.Runtime(device), gpt_config, precision=distributed.pick_precision("auto", device))
    splits = train.load_labelled_text(cfg)  # then as train.pipeline does for one strategy:
    tokens = data.tokenize(splits, cfg.max_length, classify.longest_text(gpt_config, cfg.pooling))
    gpt_model = train.load_gpt(cfg, gpt_config)
    if method == "ours":
        model = train.build_classifier(gpt_model, len(splits.label_names), "last", cfg.seed)
    else:
        torch.manual_seed(cfg.seed)  # the same head initialisation as train.build_classifier
        model = BookClassifier(gpt_model, len(splits.label_names), pooling="last")
        model.pad_to = tokens.max_length
    train.freeze(model, strategy, cfg.seed, cfg)
    inputs = {name: fastpath.SplitInputs(dataset) for name, dataset in tokens.items()}
    training = train.fine_tune(model, inputs, strategy, cfg.seed, job)
    train.restore_state(model, training.best_state)
    reports = train.evaluate_splits(model, inputs, splits.label_names, job)[0]
    seconds = time.perf_counter() - started
    examples = len(tokens.train) * args.epochs
    return {
        "method": method,
        "strategy": strategy,
        "compile": args.compile,
        "seconds": seconds,
        "training_examples_per_second": examples / seconds,
        "peak_memory_bytes": peak_memory_bytes(job.runtime.device),
        "test_accuracy": reports["test"].accuracy,
        "prefix_cache": report.describe_cache(training.cache),
    }


def run_in_child(method: str, strategy: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--child", method, strategy, "--child-result", str(result_file),
                   *forwarded_arguments(args)]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        process_seconds = time.perf_counter() - started  # the whole process: start, imports, run, exit
        return {**json.loads(result_file.read_text()), "process_seconds": process_seconds}


def forwarded_arguments(args: argparse.Namespace) -> list[str]:
    forwarded = ["--model", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                 "--seed", str(args.seed), "--device", args.device] + (["--compile"] if args.compile else [])
    return forwarded + (["--data", args.data] if args.data else [])


REPO = Path(__file__).resolve().parents[1]
TINY_GPT = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128, "vocab_size": 50257}


def default_job(args: argparse.Namespace, compile: bool, folder: Path) -> dict:
    """`python train.py --data DATA --init random` (the book's experiment on random weights), as a
    whole process, timed from its start to its exit."""
    out = folder / f"default-job{'-compile' if compile else ''}"
    command = [sys.executable, str(REPO / "train.py"), "--data", args.data, "--init", "random", "--out", str(out),
               "--device", args.device, "--seed", str(args.seed)]
    command += (["--model", args.model] if args.model != "gpt2-small" else []) + (["--compile"] if compile else [])
    command += ["--epochs", str(args.epochs)] if args.epochs != 5 else []
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    process_seconds = time.perf_counter() - started
    document = json.loads((out / "metrics.json").read_text())
    return {"command": " ".join(["python", "train.py", *command[2:]]), "compile": compile,
            "process_seconds": process_seconds, "test_accuracy": document["test"]["accuracy"],
            "timing": document["timing"], "prefix_cache": document["prefix_cache"], "device": document["device"]}


def gpu_check(args: argparse.Namespace) -> dict:
    """The default job and our method for last-block and all, without and with --compile."""
    if args.data is None:
        raise SystemExit("--gpu-check needs --data (the SMS Spam Collection file): the machine may be offline")
    with tempfile.TemporaryDirectory() as folder:
        if args.dry_run:  # any machine: a 2-block GPT, 1 epoch; checks the script, measures nothing
            (Path(folder) / "tiny-gpt").mkdir()
            (Path(folder) / "tiny-gpt" / "config.json").write_text(json.dumps(TINY_GPT))
            args.model, args.epochs = str(Path(folder) / "tiny-gpt"), 1
        jobs, rows = [], []
        for compile in (False, True):
            print(f"default job{' --compile' if compile else ''} ...", flush=True)
            jobs.append(default_job(args, compile, Path(folder)))
            print(f"  {jobs[-1]['process_seconds']:.1f} s, test accuracy {jobs[-1]['test_accuracy']:.2%}", flush=True)
        for strategy in ("last-block", "all"):
            for compile in (False, True):
                print(f"speed: {strategy} / ours{' --compile' if compile else ''} ...", flush=True)
                rows.append(run_in_child("ours", strategy, argparse.Namespace(**{**vars(args), "compile": compile})))
                print(f"  {rows[-1]['process_seconds']:.1f} s, test accuracy {rows[-1]['test_accuracy']:.2%}",
                      flush=True)
    return {"dry_run": args.dry_run, "default_job": jobs, "speed": rows,
            "targets": {"default job, whole process": "<= 10 s (the book's code: 25.3 s on an H200)",
                        "all, 5 epochs, whole process": "<= 12 s (the book's code: 35.1 s on an H200)"}}


def format_table(rows: list[dict]) -> str:
    header = ["strategy", "method", "wall s", "train ex/s", "peak mem", "test acc", "speed-up"]
    lines = [header]
    for row in rows:
        lines.append([row["strategy"], row["method"], f"{row['seconds']:.1f}",
                      f"{row['training_examples_per_second']:.1f}",
                      f"{row['peak_memory_bytes'] / 2**20:.0f} MiB", f"{row['test_accuracy']:.2%}",
                      f"{row['speedup']:.1f}x"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="the SMS Spam Collection file (default: download it)")
    parser.add_argument("--model", default="gpt2-small", help="architecture (random weights are used)")
    parser.add_argument("--strategies", default="last-block,all")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default="benchmarks/finetune_speed.json", help="where the table is written")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (CUDA only)")
    parser.add_argument("--gpu-check", action="store_true", help="the GPU check (benchmarks/gpu.sh): the default "
                        "job and ours for last-block and all, each without and with --compile, whole processes")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu-check: a 2-block model and 1 epoch, to "
                        "check the script on any machine (measures nothing)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "STRATEGY"), help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    return parser


def machine_facts() -> dict:
    """The machine, for the record: with a GPU, its name, compute capability and the precision
    --precision auto picks on it."""
    device = distributed.pick_device("auto")
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available()
            else None, "precision": str(distributed.pick_precision("auto", device)).removeprefix("torch.")}


def main() -> int:
    args = build_parser().parse_args()
    if args.child:
        Path(args.child_result).write_text(json.dumps(run_one(*args.child, args)))
        return 0
    if args.gpu_check:
        document = {"machine": machine_facts(), "arguments": vars(args), **gpu_check(args)}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"written to {args.json}")
        return 0
    rows = []
    for strategy in args.strategies.split(","):
        for method in args.methods.split(","):
            print(f"running {strategy} / {method} ...", flush=True)
            rows.append(run_in_child(method, strategy, args))
            print(f"  {rows[-1]['seconds']:.1f} s, test accuracy {rows[-1]['test_accuracy']:.2%}", flush=True)
    for row in rows:
        baseline = next((r for r in rows if r["strategy"] == row["strategy"] and r["method"] == "book"), row)
        row["speedup"] = baseline["seconds"] / row["seconds"]
    print(format_table(rows))
    Path(args.json).write_text(json.dumps({"machine": machine_facts(), "arguments": vars(args), "rows": rows}, indent=2)
                               + "\n")
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
