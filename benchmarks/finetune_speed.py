"""How much faster is our fine-tuning than the book's method, for the same result?

The book's method (its chapter 6 code) pads every text to the longest training text, runs the
whole network on every position at every step, and applies the head to every position. Ours
(train.py's fast path, fastpath.py) caches what the frozen blocks compute, pads each batch only to
its own longest text, and runs the last block only where the head reads. Both runs share
everything else: data, split, seed, initial weights, batch order, optimizer, per-epoch
validation, best-epoch choice and final evaluation, so their test accuracies agree up to
rounding and the time ratio is the price of the method alone.

Each (strategy, method) pair runs in its own process, so its peak memory is its own.

    python benchmarks/finetune_speed.py --data ../shared/data/sms_spam/SMSSpamCollection
    python benchmarks/finetune_speed.py --strategies last-block --epochs 5 --json speed.json

Never run by CI: on a 2-core CPU it takes about 12 minutes for last-block and 33 for all.
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
import train

METHODS = ("book", "ours")


class BookClassifier(classify.GPTClassifier):
    """The book's compute: every text padded to `pad_to` tokens, every block on every position,
    the head on every position; then the logits of each text's last real token are read (the
    same representation as ours, so both methods learn the same function)."""

    pad_to: int = 0

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
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
        use_prefix_cache=method == "ours",
    )
    shape = train.check_config(cfg)
    job = train.Job(cfg, distributed.Runtime(distributed.pick_device(cfg.device)), report.quiet)
    splits, tokens = train.load_text_and_tokens(cfg, shape)
    gpt_model = train.load_gpt(cfg, shape)
    if method == "ours":
        initial = train.build_classifier(gpt_model, len(splits.label_names), "last", cfg.seed)
    else:
        torch.manual_seed(cfg.seed)  # the same head initialisation as train.build_classifier
        initial = BookClassifier(gpt_model, len(splits.label_names), pooling="last")
        initial.pad_to = tokens.max_length
    model = train.prepare_strategy(initial, strategy, job)  # then as train.run does for each strategy:
    inputs = {name: fastpath.SplitInputs(dataset) for name, dataset in tokens.items()}
    training = train.fine_tune(model, inputs, strategy, job)
    train.restore_state(model, training.best_state)
    reports = train.evaluate_splits(model, inputs, splits.label_names, job)[0]
    seconds = time.perf_counter() - started
    examples = len(tokens.train) * args.epochs
    return {
        "method": method,
        "strategy": strategy,
        "seconds": seconds,
        "training_examples_per_second": examples / seconds,
        "peak_memory_bytes": peak_memory_bytes(job.runtime.device),
        "test_accuracy": reports["test"].accuracy,
        "prefix_cache": training.cache.describe(),
    }


def run_in_child(method: str, strategy: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--child", method, strategy, "--child-result", str(result_file),
                   *forwarded_arguments(args)]
        subprocess.run(command, check=True)
        return json.loads(result_file.read_text())


def forwarded_arguments(args: argparse.Namespace) -> list[str]:
    forwarded = ["--model", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                 "--seed", str(args.seed), "--device", args.device]
    return forwarded + (["--data", args.data] if args.data else [])


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
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "STRATEGY"), help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.child:
        Path(args.child_result).write_text(json.dumps(run_one(*args.child, args)))
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
    machine = {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    Path(args.json).write_text(json.dumps({"machine": machine, "arguments": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
