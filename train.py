"""Fine-tune GPT-2 to classify text: chapter 06's whole pipeline, end to end.

This file is the main job. It reads top to bottom as the chapter's pipeline (section
"Pipeline de treinamento para classificação"):

    1. labelled text       data.load_splits               (train / validation / test)
    2. tokenization        data.get_tokenizer, ClassificationDataset.from_texts
    3. GPT                 gpt.load_gpt2, or gpt.GPTModel with random weights (--init random)
    4. representation      classify.GPTClassifier(pooling="last"): one vector per text
    5. classification head classify.GPTClassifier.head, then freezing (classify.apply_strategy)
    6. supervised loss     cross-entropy between the head's logits and the labels
    7. weight update       AdamW over the trainable parameters only

and then evaluates the result with the chapter's metrics (section "Avaliando classificadores de
texto": accuracy, precision, recall, F1-score, confusion matrix; metrics.py), compares
fine-tuning strategies (section "Estratégias de Fine-Tuning", `--compare`), and saves a model
that classify.py loads (section "Inferência e uso prático do modelo").

Two fast paths change how much is computed, never the result (tests prove both equal the plain
path): when the embeddings and the first k blocks are frozen and dropout is 0, their outputs are
the same in every epoch, so they are computed once per text (`classify.PrefixCache`) and only
the trainable top runs each step; and batches hold texts of similar length
(`data.BucketBatchSampler`), padded only to their own longest text.

Scaling out (README "Scaling out"): under `torchrun --nproc_per_node=N train.py ...` the
processes train one model together with DistributedDataParallel. --batch-size stays the number
of texts per weight update; every process draws the same batches and trains on its share of
each, and the result is the one process's result (`Runtime`, `data_parallel`, `together`).

    python train.py                                  # the chapter's experiment
    python train.py --data SMSSpamCollection --init random --epochs 1   # offline
    python train.py --compare head,last-block,all    # the strategies side by side
    torchrun --nproc_per_node=4 train.py             # the same experiment on 4 GPUs
"""

from __future__ import annotations

import warnings

# torch warns at import when numpy is missing; this project does not use numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TypeVar  # noqa: E402

import torch  # noqa: E402
from torch import distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import classify  # noqa: E402
import data  # noqa: E402
import gpt  # noqa: E402
import metrics  # noqa: E402

Log = Callable[[str], None]

OFFLINE_HINT = (
    "offline, use local files: --data PATH (the SMS Spam Collection file or your CSV), "
    "--model PATH (a Hugging Face folder or a .safetensors file), or --init random (no weights needed)"
)


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything one run depends on. The defaults are the chapter's experiment."""

    data: str | None = None  # None: download the SMS Spam Collection
    validation_data: str | None = None
    test_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    balanced: bool = True  # the chapter undersamples ham to the 747 spam messages
    model: str = "gpt2-small"
    init: str = "pretrained"  # or "random": same architecture, random weights
    strategy: str = "last-block"
    pooling: str = "last"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    max_length: int | None = None  # None: the longest training text (at most the context length)
    seed: int = 123
    device: str = "auto"
    out: str | None = None  # None: runs/<timestamp>
    eval_every: int = 0  # 0: evaluate only at the end of each epoch
    plot: bool = False
    compare: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    compile: bool = False
    use_prefix_cache: bool = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune GPT-2 for text classification (chapter 06 of 'Fazendo um LLM do Zero'). "
        "With no arguments: the chapter's experiment (pretrained gpt2-small, SMS spam, last block, 5 epochs).",
    )
    defaults = TrainConfig()
    group = parser.add_argument_group("1. labelled text")
    group.add_argument("--data", default=defaults.data, metavar="PATH",
                       help="training data: a file in the SMS Spam Collection's format (label<TAB>text), or a "
                       "CSV/TSV with a header. Default: download the SMS Spam Collection once (then cached)")
    group.add_argument("--validation-data", default=None, metavar="PATH",
                       help="a separate validation file (with --test-data); default: split --data 70/10/20")
    group.add_argument("--test-data", default=None, metavar="PATH", help="a separate test file (with --validation-data)")
    group.add_argument("--text-column", default=defaults.text_column, metavar="NAME",
                       help="CSV/TSV column holding the text (default: %(default)s)")
    group.add_argument("--label-column", default=defaults.label_column, metavar="NAME",
                       help="CSV/TSV column holding the class (default: %(default)s)")
    group.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=defaults.balanced,
                       help="undersample every class to the smallest one, as the chapter does (SMS: 1,045/149/300; "
                       "the default); --no-balanced keeps all the data and splits it stratified")
    group = parser.add_argument_group("2. tokenization")
    group.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                       help="cut texts to this many tokens; default: the longest training text, "
                       "at most the model's context length")
    group = parser.add_argument_group("3. GPT")
    group.add_argument("--model", default=defaults.model, metavar="NAME_OR_PATH",
                       help=f"a preset ({', '.join(gpt.PRESETS)}), a Hugging Face folder or a .safetensors file "
                       "(default: %(default)s)")
    group.add_argument("--init", default=defaults.init, choices=("pretrained", "random"),
                       help="'random': the same architecture with random weights (what does pretraining buy? "
                       "also runs offline; default: %(default)s)")
    group.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="where downloads are kept (default: $GPT2_CLASSIFICATION_CACHE or ~/.cache/gpt2-classification)")
    group = parser.add_argument_group("4-5. representation and classification head")
    group.add_argument("--pooling", default=defaults.pooling, metavar="{" + ",".join(classify.POOLINGS) + "}",
                       help="which vector represents the text ('last': the last real token, the only one that "
                       "has seen the whole text; default: %(default)s)")
    group.add_argument("--strategy", default=defaults.strategy, metavar="NAME",
                       help="what is trained: head, last-block, last-N-blocks (e.g. last-2-blocks), all, "
                       "gradual (one more block unfrozen per epoch), lora (default: %(default)s)")
    group.add_argument("--lora-rank", type=int, default=defaults.lora_rank, metavar="R",
                       help="rank of the LoRA adapters (default: %(default)s)")
    group.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, metavar="ALPHA",
                       help="the LoRA update is scaled by alpha / rank (default: %(default)s)")
    group = parser.add_argument_group("6-7. supervised loss and weight update")
    group.add_argument("--epochs", type=int, default=defaults.epochs, metavar="N",
                       help="passes over the training data (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                       help="texts per weight update (default: %(default)s)")
    group.add_argument("--lr", type=float, default=defaults.lr, metavar="RATE",
                       help="AdamW learning rate (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, metavar="W",
                       help="AdamW weight decay (default: %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, metavar="N",
                       help="one seed for the splits, the new weights and the batch order (default: %(default)s)")
    group.add_argument("--eval-every", type=int, default=defaults.eval_every, metavar="STEPS",
                       help="also print the validation loss every this many steps (default 0: only after each epoch)")
    group = parser.add_argument_group("running and output")
    group.add_argument("--device", default=defaults.device, metavar="NAME",
                       help="auto (the default: cuda, then mps, then cpu), cuda, mps or cpu")
    group.add_argument("--out", default=None, metavar="DIR",
                       help="where the run is written (classifier.safetensors, config.json, metrics.json); "
                       "default: runs/<timestamp>")
    group.add_argument("--plot", action="store_true",
                       help="also write loss/accuracy curves and confusion matrices as PNG (needs matplotlib)")
    group.add_argument("--compare", default="", metavar="STRATEGY,STRATEGY,...",
                       help="train each listed strategy from the same starting weights and data, "
                       "then print one table (e.g. head,last-block,all)")
    group.add_argument("--compile", action="store_true", help="torch.compile the blocks (CUDA only)")
    group.add_argument("--no-cache", dest="use_prefix_cache", action="store_false",
                       help="do not cache the frozen blocks' outputs (slower, same result: for comparison)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values["compare"] = [name.strip() for name in args.compare.split(",") if name.strip()]
    return TrainConfig(**values)


def check_config(cfg: TrainConfig) -> gpt.GPTConfig:
    """Reject bad arguments before anything is downloaded or trained; returns the model's shape."""
    model_shape = gpt.load_config(cfg.model)  # ValueError on an unknown name or bad path
    for name in cfg.compare or [cfg.strategy]:
        classify.trainable_blocks(name, model_shape.n_layers)  # ValueError: unknown, or more blocks than the model has
    if cfg.pooling not in classify.POOLINGS:
        raise ValueError(f"unknown pooling {cfg.pooling!r}; choose one of {', '.join(classify.POOLINGS)}")
    for flag, value in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    if "lora" in (cfg.compare or [cfg.strategy]) and cfg.lora_rank < 1:
        raise ValueError(f"--lora-rank {cfg.lora_rank}: must be at least 1")
    if cfg.lr <= 0:
        raise ValueError(f"--lr {cfg.lr}: must be greater than 0")
    for flag, value in (("--weight-decay", cfg.weight_decay), ("--eval-every", cfg.eval_every)):
        if value < 0:
            raise ValueError(f"{flag} {value}: must be 0 or more")
    if (cfg.validation_data is None) != (cfg.test_data is None):
        raise ValueError("give both --validation-data and --test-data, or neither (to split --data 70/10/20)")
    for flag, path in (("--data", cfg.data), ("--validation-data", cfg.validation_data),
                       ("--test-data", cfg.test_data)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    if cfg.max_length is not None and not 1 <= cfg.max_length <= model_shape.context_length:
        raise ValueError(
            f"--max-length {cfg.max_length}: must be between 1 and the model's context length "
            f"{model_shape.context_length}"
        )
    return model_shape


@dataclass
class Runtime:
    """Where the computation happens: the device and, under torchrun, this process's place
    among the processes that train one model together (data parallelism, README "Scaling out").
    One process alone is rank 0 of 1."""

    device: torch.device
    rank: int = 0  # 0..world_size-1; rank 0 alone prints and writes
    world_size: int = 1
    local_rank: int = 0  # among the processes on this machine: its GPU

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA; fp32 elsewhere (CPUs without native bf16 run it ~100x slower)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def share(self, indices: list[int]) -> list[int]:
        """This process's texts of a batch: every world_size-th from its rank on (all of them
        in one process). Batches hold texts sorted by length, so every share costs the same."""
        return indices[self.rank :: self.world_size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes (all-reduce); in one process, `tensor` itself."""
        if not self.distributed:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)  # every process receives the same sum
        return total


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    kind = name.split(":")[0]
    if kind not in available:
        raise ValueError(f"unknown --device {name!r}; choose auto, cuda, mps or cpu")
    if not available[kind]:
        raise ValueError(f"--device {name}: not available on this machine; use --device auto or cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- scaling out: torchrun

# How long a process waits in a collective for the others before it gives up. Long enough for
# rank 0 to download gpt2-xl (6 GB) while the others wait for it; a failed process does not
# make the others wait this long: torchrun stops every process as soon as one exits with an error.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


class OtherProcessFailed(RuntimeError):
    """Raised on the healthy processes when another one failed (it printed its own message)."""


class StoppedByTorchrun(RuntimeError):
    """SIGTERM: torchrun stops every process when one of them fails."""


def process_label() -> str:
    """'[rank 1] ' under torchrun, '' in one process: prefixes the messages printed on stderr."""
    return f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def start_runtime(device_name: str) -> Runtime:
    """The device to compute on. Under torchrun (WORLD_SIZE > 1 in the environment) also join
    the process group: NCCL between GPUs (this process takes cuda:LOCAL_RANK), gloo between
    CPU processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return Runtime(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device_name}: under torchrun each process takes cuda:LOCAL_RANK; "
                             "give --device cuda (or auto)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"torchrun started more processes on this machine than it has GPUs "
                             f"({torch.cuda.device_count()}); use --nproc_per_node {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {device_name}: under torchrun use cuda (NCCL) or cpu (gloo)")

    def stop(signum, frame):
        raise StoppedByTorchrun("stopped by torchrun (another process failed: see its message)")

    signal.signal(signal.SIGTERM, stop)  # an exception, so that the run folder is cleaned up
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                            timeout=PROCESS_GROUP_TIMEOUT)
    return Runtime(device, rank, world_size, local_rank)


def stop_runtime(runtime: Runtime, *, wait_for_others: bool = False) -> None:
    """Leave the process group. After a successful run, `wait_for_others` first waits until
    every process has got here, so that none tears the group down while another still
    exchanges with it (gloo then aborts the process); after a failure, don't wait: another
    process may never arrive."""
    if runtime.distributed and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


Result = TypeVar("Result")


def together(runtime: Runtime, work: Callable[[], Result] | None) -> Result | None:
    """Run `work` on this process (None: nothing to do here this time), then learn whether it
    succeeded on every process. A failure anywhere raises on all of them: its own error on the
    process that failed, OtherProcessFailed on the others; nobody is left waiting."""
    result, error = None, None
    if work is not None:
        try:
            result = work()
        except Exception as caught:  # noqa: BLE001 - re-raised below, after the others are told
            error = caught
    failed: list[int] = []
    if runtime.distributed:
        flags = torch.zeros(runtime.world_size, device=runtime.device)  # (world_size,)
        flags[runtime.rank] = float(error is not None)
        failed = [rank for rank, flag in enumerate(runtime.sum(flags).tolist()) if flag]
    if error is not None:
        raise error
    if failed:
        ranks = ", ".join(map(str, failed))
        raise OtherProcessFailed(f"stopped: rank {ranks} failed (see the message{'s' if len(failed) > 1 else ''} above)")
    return result


def load_in_turn(runtime: Runtime, load: Callable[[], Result]) -> Result:
    """Run `load` on every process, rank 0 first: it downloads whatever is missing (data, BPE
    files, weights) while the others wait, so no two downloads race on one cache. Then the
    first process of each other machine (its own cache, where the machines share no disk),
    then all the rest, from the cache. Every process learns after each turn whether it went
    well: a failure stops them all."""
    if not runtime.distributed:
        return load()
    my_turn = 0 if runtime.rank == 0 else 1 if runtime.local_rank == 0 else 2
    for turn in range(3):
        loaded = together(runtime, load if turn == my_turn else None)
        if turn == my_turn:
            result = loaded
    return result


class ClassifierForward(nn.Module):
    """The classifier's two ways in behind one `forward`: token ids through the whole model
    (start_block None), or the cached output of the frozen blocks[:start_block] through the
    rest. DistributedDataParallel acts when its module is called (it prepares the gradient
    all-reduce there), so both ways must pass through one module's __call__."""

    def __init__(self, classifier: classify.GPTClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor, start_block: int | None = None) -> torch.Tensor:
        if start_block is None:
            return self.classifier(inputs, lengths)  # inputs: token ids (B, T) -> (B, K)
        return self.classifier.forward_from(inputs, lengths, start_block)  # inputs: hidden (B, T, C) -> (B, K)


def data_parallel(model: classify.GPTClassifier, runtime: Runtime) -> nn.Module:
    """What a training step calls. One process: the classifier. Under torchrun: the classifier
    inside DistributedDataParallel, which copies rank 0's weights to every process when built
    and, during backward, averages the gradients of the trainable parameters over the
    processes (frozen ones, requires_grad False when it is built, are left out). Build it again
    whenever the trainable set changes (gradual): every process does so at the same epoch."""
    forward = ClassifierForward(model)
    if not runtime.distributed:
        return forward
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(forward, device_ids=device_ids)  # the model has no buffers to sync


# --------------------------------------------------------------------------- step 1: labelled text


def load_labelled_text(cfg: TrainConfig) -> data.Splits:
    """Step 1, "Texto rotulado": texts with their classes, split into train / validation / test."""
    splits = data.load_splits(
        cfg.data,
        seed=cfg.seed,
        balanced=cfg.balanced,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        validation_path=cfg.validation_data,
        test_path=cfg.test_data,
        cache_dir=cfg.cache_dir,
        progress=gpt.print_progress,
    )
    present = sorted({splits.label_names[label] for label in splits.train.labels})
    if len(present) < 2:
        raise ValueError(f"the training data has one class only ({present}); a classifier needs two or more")
    for name in ("train", "validation", "test"):
        if len(getattr(splits, name)) == 0:
            raise ValueError(f"the {name} split is empty: the data set is too small to split 70/10/20")
    return splits


# --------------------------------------------------------------------------- step 2: tokenization


@dataclass
class TokenizedSplits:
    """Step 2's output: token ids and labels of each split, all cut to `max_length` tokens."""

    train: data.ClassificationDataset
    validation: data.ClassificationDataset
    test: data.ClassificationDataset
    max_length: int

    def items(self) -> list[tuple[str, data.ClassificationDataset]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


def tokenize(splits: data.Splits, tokenizer, max_length: int | None, context_length: int) -> TokenizedSplits:
    """Step 2, "Tokenização": GPT-2's BPE turns each text into token ids.

    Without max_length the training set's longest text sets it (as in the chapter), but never
    beyond the model's context length; validation and test texts are cut to the same length.
    """
    train = data.ClassificationDataset.from_texts(splits.train, tokenizer, max_length or context_length)
    max_length = max_length or max(train.lengths)
    validation = data.ClassificationDataset.from_texts(splits.validation, tokenizer, max_length)
    test = data.ClassificationDataset.from_texts(splits.test, tokenizer, max_length)
    return TokenizedSplits(train, validation, test, max_length)


# --------------------------------------------------------------------------- step 3: GPT


def load_gpt(cfg: TrainConfig, model_shape: gpt.GPTConfig) -> gpt.GPTModel:
    """Step 3, "GPT": the pretrained model, or the same architecture with random weights."""
    if cfg.init == "random":
        torch.manual_seed(cfg.seed)
        return gpt.GPTModel(model_shape)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
    # model_shape is check_config's gpt.load_config(cfg.model): pass it, so the file is not parsed again
    return gpt.load_gpt2(cfg.model, cache_dir=cache_dir, progress=gpt.print_progress, config=model_shape)


# --------------------------------------------------------------------------- steps 4-5: representation, head, freezing


def build_classifier(gpt_model: gpt.GPTModel, num_classes: int, pooling: str, seed: int) -> classify.GPTClassifier:
    """Steps 4 and 5: GPT's hidden state at one position (or a mean) represents the text, and a
    new linear head maps it to one logit per class, replacing the vocabulary head."""
    torch.manual_seed(seed)  # the head's random initialisation
    return classify.GPTClassifier(gpt_model, num_classes, pooling=pooling)


def describe_trainable(model: classify.GPTClassifier) -> str:
    """Which parts are trained, in words: 'head + ln_f + blocks 10-11'."""

    trains = classify.trains
    parts = ["head"] if trains(model.head) else []
    if trains(model.gpt.ln_f):
        parts.append("final LayerNorm")
    blocks = [i for i, block in enumerate(model.gpt.h) if trains(block)]
    if blocks:
        ranges = f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
        parts.append(f"block{'s' if len(blocks) > 1 else ''} {ranges}")
    if trains(model.gpt.wte) or trains(model.gpt.wpe):
        parts.append("embeddings")
    return " + ".join(parts) or "nothing"


def parameter_counts(model: nn.Module) -> dict[str, float]:
    trainable, total = classify.count_parameters(model)
    return {"trainable": trainable, "total": total, "share": trainable / total}


# --------------------------------------------------------------------------- fast paths: prefix cache, batches


CACHE_MEMORY_BUDGET = 2**30  # bytes, for all three splits together


@dataclass
class SplitInputs:
    """One split, ready for the model: its examples, labels, and (when the frozen prefix allows
    it) the cached output of the frozen blocks."""

    dataset: data.ClassificationDataset
    labels: torch.Tensor  # (N,) long, on the CPU
    cache: classify.PrefixCache | None = None

    @classmethod
    def of(cls, dataset: data.ClassificationDataset) -> SplitInputs:
        return cls(dataset, torch.tensor(dataset.labels, dtype=torch.long))


@dataclass
class CacheStatus:
    """What the frozen-prefix cache does in this run, for the log and metrics.json."""

    used: bool
    start_block: int | None = None
    nbytes: int = 0
    dtype: str | None = None
    seconds: float = 0.0
    reason: str = ""

    def describe(self) -> str:
        if not self.used:
            return f"frozen-prefix cache off ({self.reason})"
        return (
            f"frozen-prefix cache: outputs of the embeddings and blocks 0-{self.start_block - 1} computed once, "
            f"{format_bytes(self.nbytes)} ({self.dtype}), built in {self.seconds:.1f} s"
        )


def format_bytes(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def refresh_prefix_caches(
    model: classify.GPTClassifier, inputs: dict[str, SplitInputs], enabled: bool, runtime: Runtime
) -> CacheStatus:
    """Cache what the frozen prefix computes, for every split; rebuilt only when the boundary
    between frozen and trainable blocks moved (the "gradual" strategy moves it every epoch)."""
    start_block = classify.frozen_prefix_length(model)
    if not enabled:
        reason = "--no-cache"
    elif start_block is None or start_block == 0:
        reason = "no frozen block before the trainable ones, or dropout > 0"
    else:
        reason = ""
    if reason:
        for split_inputs in inputs.values():
            split_inputs.cache = None
        return CacheStatus(used=False, reason=reason)

    started = time.perf_counter()
    total_tokens = sum(sum(split_inputs.dataset.lengths) for split_inputs in inputs.values())
    for split_inputs in inputs.values():
        if split_inputs.cache is not None and split_inputs.cache.start_block == start_block:
            continue
        split_inputs.cache = None  # free the old cache before building the new one
        budget = CACHE_MEMORY_BUDGET * sum(split_inputs.dataset.lengths) // total_tokens
        split_inputs.cache = build_prefix_cache(model, split_inputs.dataset, start_block, runtime, budget)
    caches = [split_inputs.cache for split_inputs in inputs.values()]
    if any(cache is None for cache in caches):
        for split_inputs in inputs.values():
            split_inputs.cache = None
        return CacheStatus(used=False, reason=f"does not fit in {CACHE_MEMORY_BUDGET / 2**30:.0f} GiB")
    return CacheStatus(
        used=True,
        start_block=start_block,
        nbytes=sum(cache.nbytes for cache in caches),
        dtype=str(caches[0].dtype).removeprefix("torch."),
        seconds=time.perf_counter() - started,
    )


def build_prefix_cache(
    model: classify.GPTClassifier, dataset: data.ClassificationDataset, start_block: int, runtime: Runtime,
    memory_budget_bytes: int,
) -> classify.PrefixCache | None:
    """The frozen prefix's output for every text of a split (None: it does not fit the budget).

    Under torchrun each process runs the frozen blocks over its own share of the texts (every
    world_size-th in order of length, so the shares cost the same), then each share is
    broadcast from its process into one tensor that every process keeps whole: a training
    batch may hand any text to any process, and the prefix still runs once per text in all.
    """
    if not runtime.distributed:
        return classify.PrefixCache.build(
            model, dataset.token_ids, start_block, runtime.device, memory_budget_bytes=memory_budget_bytes
        )
    by_length = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])
    shares = [by_length[rank :: runtime.world_size] for rank in range(runtime.world_size)]
    mine = shares[runtime.rank]
    budget = memory_budget_bytes * sum(dataset.lengths[i] for i in mine) // sum(dataset.lengths)
    piece = classify.PrefixCache.build(
        model, [dataset.token_ids[i] for i in mine], start_block, runtime.device, memory_budget_bytes=budget
    )
    # What every process needs to know of every piece: its storage (0: it did not fit, 1:
    # float32, 2: float16) and how many positions it stores per text (summed: each text is in one share).
    storage = torch.zeros(runtime.world_size, dtype=torch.long)  # (world_size,)
    lengths = torch.zeros(len(dataset), dtype=torch.long)  # (N,)
    if piece is not None:
        storage[runtime.rank] = 1 if piece.dtype == torch.float32 else 2
        lengths[mine] = piece.lengths
    storage = runtime.sum(storage.to(runtime.device)).tolist()
    lengths = runtime.sum(lengths.to(runtime.device)).cpu()  # (N,)
    if 0 in storage:
        return None  # every process takes the same decision: it sees every piece's storage
    dtype = torch.float16 if 2 in storage else torch.float32
    offsets = torch.empty(len(dataset), dtype=torch.long)  # (N,)
    states = torch.empty(int(lengths.sum()), model.gpt.cfg.emb_dim, dtype=dtype, device=runtime.device)  # (rows, C)
    row = 0
    for rank, share in enumerate(shares):
        share_lengths = lengths[share]  # (n,) positions stored per text, in the share's order
        offsets[share] = row + torch.cumsum(share_lengths, dim=0) - share_lengths
        rows = int(share_lengths.sum())
        if rows:
            share_states = states[row : row + rows]  # (rows of this share, C), a view
            if rank == runtime.rank:
                share_states.copy_(piece.states)
            dist.broadcast(share_states, src=rank)
        row += rows
    if dtype == torch.float16 and not bool(torch.isfinite(states).all()):
        return None  # a float32 share beyond float16's range (the shares' budgets disagreed)
    return classify.PrefixCache(states, offsets, lengths, start_block)


def forward_batch(
    network: nn.Module, inputs: SplitInputs, indices: list[int], runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the examples at `indices`: through the whole model (steps 2-5), or
    from the cached frozen prefix through the trainable top only. Same numbers either way.
    `network` is a ClassifierForward, or the DistributedDataParallel around one."""
    labels = inputs.labels[indices].to(runtime.device)  # (B,)
    with runtime.autocast:
        if inputs.cache is not None:
            hidden, lengths = inputs.cache.batch(indices)  # (B, T, C), (B,)
            logits = network(hidden, lengths.to(runtime.device), inputs.cache.start_block)  # (B, K)
        else:
            batch = data.collate([inputs.dataset[i] for i in indices]).to(runtime.device)
            logits = network(batch.token_ids, batch.lengths)  # (B, K)
    return logits.float(), labels


def training_batches(lengths: list[int], cfg: TrainConfig) -> data.BucketBatchSampler:
    """Batches of similar-length texts, reshuffled every epoch (call set_epoch) from one seed.
    --batch-size is the whole batch: under torchrun every process draws these same batches
    and trains on its share of each (Runtime.share)."""
    return data.BucketBatchSampler(lengths, cfg.batch_size, cfg.seed)


# --------------------------------------------------------------------------- step 6: supervised loss


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Step 6, "Cálculo da loss supervisionada": cross-entropy, the negative log-probability the
    model gives each text's true class, averaged over the batch."""
    return F.cross_entropy(logits, labels)  # logits (B, K), labels (B,) -> scalar


@dataclass
class Evaluation:
    """Loss and predictions over one whole split, in the split's order."""

    loss: float
    y_true: list[int]
    y_pred: list[int]

    @property
    def accuracy(self) -> float:
        return metrics.accuracy(self.y_true, self.y_pred)


@torch.no_grad()
def evaluate(model: classify.GPTClassifier, inputs: SplitInputs, batch_size: int, runtime: Runtime) -> Evaluation:
    """Mean loss and every prediction over a split, in batches ordered by length.

    Under torchrun each process predicts its share of every batch; the predictions (zero where
    another process predicted) and the loss are summed over the processes, so every process
    holds the whole split's and computes the same metrics (rank 0 alone prints them)."""
    model.eval()
    network = ClassifierForward(model)
    num_examples = len(inputs.dataset)
    predictions = torch.zeros(num_examples, dtype=torch.long)  # (N,)
    loss_sum = 0.0
    for indices in data.BucketBatchSampler(inputs.dataset.lengths, batch_size, seed=0, shuffle=False):
        mine = runtime.share(indices)
        if not mine:
            continue
        logits, labels = forward_batch(network, inputs, mine, runtime)  # (B, K), (B,)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        predictions[mine] = logits.argmax(dim=-1).cpu()  # (B,)
    if runtime.distributed:
        loss_sum = runtime.sum(torch.tensor(loss_sum, dtype=torch.float64, device=runtime.device)).item()
        predictions = runtime.sum(predictions.to(runtime.device)).cpu()  # (N,)
    return Evaluation(loss_sum / num_examples, inputs.labels.tolist(), predictions.tolist())


# --------------------------------------------------------------------------- step 7: weight update


@dataclass
class EpochRecord:
    epoch: int
    trainable: str  # what was trained this epoch (the gradual schedule)
    train_loss: float  # mean over the epoch's batches, measured while training
    train_accuracy: float  # likewise
    validation_loss: float
    validation_accuracy: float


@dataclass
class TrainingResult:
    history: list[EpochRecord]
    step_checks: list[dict]  # validation loss every --eval-every steps
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    epoch_seconds: list[float]
    cache: CacheStatus  # as in the last epoch
    cache_seconds: float  # building it, all epochs together


def make_optimizer(parameters: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """Step 7's optimizer, AdamW, given only the trainable parameters.

    The fused kernel does the whole update in one pass over memory (on a 2-core CPU about 40x
    faster than the per-tensor loop for last-block's 7M parameters; same mathematics); older
    PyTorch without it on this device falls back to the multi-tensor version.
    """
    try:
        return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def add_unfrozen_parameters(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Give the optimizer the parameters that became trainable since it was built (gradual
    unfreezing); returns how many tensors were added."""
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [p for p in classify.trainable_parameters(model) if id(p) not in known]
    if new:
        optimizer.add_param_group({"params": new})  # lr and weight decay from the optimizer's defaults
    return len(new)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights: all that training changes."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


@dataclass
class Progress:
    """Counts steps across epochs for the progress lines: speed and estimated time left."""

    total_steps: int
    step: int = 0
    examples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def advance(self, batch_size: int) -> None:
        self.step += 1
        self.examples += batch_size

    def line(self, epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int, loss: float) -> str:
        elapsed = time.perf_counter() - self.started
        time_left = elapsed / self.step * (self.total_steps - self.step)
        return (
            f"epoch {epoch + 1}/{epochs}  step {step_in_epoch}/{steps_per_epoch}  "
            f"{self.examples / elapsed:,.0f} examples/s  loss {loss:.4f}  time left {format_seconds(time_left)}"
        )


def train_one_epoch(
    model: classify.GPTClassifier,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: dict[str, SplitInputs],
    sampler: data.BucketBatchSampler,
    epoch: int,
    cfg: TrainConfig,
    runtime: Runtime,
    progress: Progress,
    log: Log,
) -> tuple[float, float, list[dict]]:
    """One pass over the training batches: steps 6 and 7 for each. Returns the epoch's mean
    training loss and accuracy (measured while training) and the --eval-every checks.
    `network` is what data_parallel built around `model`."""
    sampler.set_epoch(epoch)  # a new batch order every epoch, the same for every run with this seed
    steps_per_epoch = len(sampler)
    log_every = max(1, steps_per_epoch // 10)  # about ten progress lines per epoch
    loss_sum = torch.zeros((), device=runtime.device)  # summed on the device: no sync per step
    correct = torch.zeros((), dtype=torch.long, device=runtime.device)
    seen, checks = 0, []
    model.train()
    for step_in_epoch, indices in enumerate(sampler, start=1):
        mine = runtime.share(indices)  # the whole batch in one process
        # A process whose share is empty (a last batch smaller than the number of processes)
        # still runs one text, weighted 0: DDP's gradient all-reduce needs every process.
        logits, labels = forward_batch(network, inputs["train"], mine or indices[:1], runtime)  # (b, K), (b,)
        loss = supervised_loss(logits, labels)  # step 6
        # DDP averages the processes' gradients; weighting each one's mean loss by its share of
        # the batch makes that average the gradient of the whole batch's mean loss (weight 1 alone).
        weight = len(mine) * runtime.world_size / len(indices)
        optimizer.zero_grad(set_to_none=True)
        (loss * weight).backward()  # gradients reach the trainable parameters only
        optimizer.step()  # step 7: AdamW moves them against their gradient

        progress.advance(len(indices))
        if mine:
            loss_sum += loss.detach() * len(mine)
            correct += (logits.argmax(dim=-1) == labels).sum()
        seen += len(indices)
        check_now = cfg.eval_every > 0 and progress.step % cfg.eval_every == 0
        if check_now or step_in_epoch % log_every == 0 or step_in_epoch == steps_per_epoch:
            mean_loss = runtime.sum(loss_sum).item() / seen  # every process: a collective
            line = progress.line(epoch, cfg.epochs, step_in_epoch, steps_per_epoch, mean_loss)
            if check_now:
                check = evaluate(model, inputs["validation"], max(cfg.batch_size, 32), runtime)
                model.train()
                checks.append({"step": progress.step, "validation_loss": check.loss})
                line += f"  validation loss {check.loss:.4f}"
            log(line)
    return runtime.sum(loss_sum).item() / seen, runtime.sum(correct).item() / seen, checks


def train_classifier(
    model: classify.GPTClassifier,
    inputs: dict[str, SplitInputs],
    cfg: TrainConfig,
    strategy: str,
    runtime: Runtime,
    log: Log,
) -> TrainingResult:
    """Epoch after epoch: (for "gradual", unfreeze one more block), train, then measure on the
    validation set. Keeps a copy of the weights of the epoch with the best validation accuracy."""
    optimizer = make_optimizer(classify.trainable_parameters(model), cfg)
    network = data_parallel(model, runtime)  # under torchrun: the same weights everywhere from here on
    sampler = training_batches(inputs["train"].dataset.lengths, cfg)
    cache = refresh_prefix_caches(model, inputs, cfg.use_prefix_cache, runtime)
    log(cache.describe())
    cache_seconds = cache.seconds

    history: list[EpochRecord] = []
    step_checks: list[dict] = []
    epoch_seconds: list[float] = []
    best: tuple[float, float] | None = None  # (validation accuracy, -validation loss)
    best_epoch, best_state = 0, trainable_state(model)
    progress = Progress(total_steps=cfg.epochs * len(sampler))
    for epoch in range(cfg.epochs):
        epoch_started = time.perf_counter()
        if strategy == "gradual" and epoch > 0:
            classify.apply_strategy(model, strategy, epoch=epoch)
            for name, value in trainable_state(model).items():
                best_state.setdefault(name, value)  # still its value at the best epoch: it was frozen
            if add_unfrozen_parameters(optimizer, model):
                del network  # the old DDP and its gradient hooks go first
                network = data_parallel(model, runtime)  # DDP synchronises the new trainable set too
                cache = refresh_prefix_caches(model, inputs, cfg.use_prefix_cache, runtime)
                cache_seconds += cache.seconds
                log(f"epoch {epoch + 1}: unfrozen, now training {describe_trainable(model)}; {cache.describe()}")
        trainable = describe_trainable(model)
        train_loss, train_accuracy, checks = train_one_epoch(
            model, network, optimizer, inputs, sampler, epoch, cfg, runtime, progress, log
        )
        step_checks += checks
        validation = evaluate(model, inputs["validation"], max(cfg.batch_size, 32), runtime)
        record = EpochRecord(epoch + 1, trainable, train_loss, train_accuracy, validation.loss, validation.accuracy)
        history.append(record)
        epoch_seconds.append(time.perf_counter() - epoch_started)
        score = (validation.accuracy, -validation.loss)
        if best is None or score > best:
            best, best_epoch, best_state = score, epoch + 1, trainable_state(model)
        log(
            f"epoch {epoch + 1}/{cfg.epochs} done in {epoch_seconds[-1]:.1f} s: "
            f"train loss {record.train_loss:.4f} accuracy {record.train_accuracy:.2%}  |  "
            f"validation loss {record.validation_loss:.4f} accuracy {record.validation_accuracy:.2%}"
            + ("  (best so far)" if best_epoch == epoch + 1 else "")
        )
    return TrainingResult(history, step_checks, best_epoch, best_state, epoch_seconds, cache, cache_seconds)


# --------------------------------------------------------------------------- one run: the pipeline end to end


@dataclass
class RunResult:
    strategy: str
    reports: dict[str, metrics.ClassificationReport]
    losses: dict[str, float]
    parameters: dict[str, float]
    training: TrainingResult
    training_seconds: float


def run_strategy(
    initial_model: classify.GPTClassifier,
    tokens: TokenizedSplits,
    label_names: list[str],
    cfg: TrainConfig,
    strategy: str,
    runtime: Runtime,
    log: Log,
) -> tuple[classify.GPTClassifier, RunResult]:
    """Freeze, train (steps 6-7), restore the best epoch, and evaluate every split."""
    model = copy.deepcopy(initial_model)  # every strategy starts from the same weights
    torch.manual_seed(cfg.seed)  # LoRA adapters are initialised at random
    classify.apply_strategy(model, strategy, epoch=0, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    model.to(runtime.device)
    if cfg.compile:
        compile_blocks(model, runtime, log)
    parameters = parameter_counts(model)
    log(
        f"strategy {strategy}: training {describe_trainable(model)}: {parameters['trainable']:,} of "
        f"{parameters['total']:,} parameters ({parameters['share']:.2%})"
    )
    if strategy == "gradual":
        log("gradual schedule: " + gradual_schedule(model, cfg.epochs))
    inputs = {name: SplitInputs.of(dataset) for name, dataset in tokens.items()}
    started = time.perf_counter()
    training = train_classifier(model, inputs, cfg, strategy, runtime, log)
    training_seconds = time.perf_counter() - started

    restore_state(model, training.best_state)
    log(f"kept the weights of epoch {training.best_epoch} (best validation accuracy)")
    refresh_prefix_caches(model, inputs, cfg.use_prefix_cache, runtime)
    reports, losses = {}, {}
    for name, split_inputs in inputs.items():
        evaluation = evaluate(model, split_inputs, max(cfg.batch_size, 32), runtime)
        reports[name] = metrics.classification_report(evaluation.y_true, evaluation.y_pred, label_names)
        losses[name] = evaluation.loss
    return model, RunResult(strategy, reports, losses, parameters, training, training_seconds)


def gradual_schedule(model: classify.GPTClassifier, epochs: int) -> str:
    """The chapter's "liberar gradualmente", epoch by epoch: how many top blocks train."""
    n_layers = len(model.gpt.h)
    counts = [classify.trainable_blocks("gradual", n_layers, epoch) for epoch in range(epochs)]
    return "; ".join(f"epoch {epoch + 1}: head + final LayerNorm" + (f" + top {n} block{'s' if n > 1 else ''}" if n else "")
                     for epoch, n in enumerate(counts))


def compile_blocks(model: classify.GPTClassifier, runtime: Runtime, log: Log) -> None:
    """torch.compile each block (CUDA only: elsewhere compile time outweighs the gain)."""
    if runtime.device.type != "cuda":
        log(f"--compile: only used on CUDA; running uncompiled on {runtime.device.type}")
        return
    if not hasattr(nn.Module, "compile"):
        log("--compile: needs PyTorch 2.2 or later; running uncompiled")
        return
    for block in model.gpt.h:
        block.compile(dynamic=True)


def metrics_document(
    result: RunResult, cfg: TrainConfig, argv: list[str], tokens: TokenizedSplits, label_names: list[str],
    model_shape: gpt.GPTConfig, runtime: Runtime, total_seconds: float,
) -> dict:
    """Everything metrics.json holds. Timings sit under "timing" alone, so two runs with one
    seed on one device give identical documents once "timing" is dropped."""
    document: dict = {}
    for name, report in result.reports.items():
        document[name] = {**report.to_dict(), "loss": result.losses[name]}
    training = result.training
    document["history"] = [asdict(record) for record in training.history]
    document["validation_checks"] = training.step_checks
    document["best_epoch"] = training.best_epoch
    document["strategy"] = result.strategy
    document["trainable_parameters"] = result.parameters
    document["data"] = {
        "label_names": label_names,
        "max_length": tokens.max_length,
        **{name: {"examples": len(dataset), "truncated": dataset.num_truncated} for name, dataset in tokens.items()},
    }
    document["model"] = {"source": cfg.model, "init": cfg.init, **asdict(model_shape)}
    document["prefix_cache"] = {k: v for k, v in asdict(training.cache).items() if k != "seconds"}
    document["device"] = runtime.device.type
    document["seed"] = cfg.seed
    document["arguments"] = {"argv": argv, "config": asdict(cfg)}
    examples = len(tokens.train) * len(training.history)
    document["timing"] = {
        "total_seconds": total_seconds,  # from the start of the run to this strategy's metrics
        "training_seconds": result.training_seconds,  # prefix cache + epochs
        "prefix_cache_seconds": training.cache_seconds,  # every (re)build
        "epoch_seconds": training.epoch_seconds,  # each with its validation pass
        "training_examples_per_second": examples / sum(training.epoch_seconds),
    }
    if runtime.distributed:
        document["timing"]["processes"] = runtime.world_size  # the results do not depend on it
    return document


def write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- plots (optional)


def write_plots(result: RunResult, out: Path) -> str:
    """Loss and accuracy curves and the confusion matrices as PNG; matplotlib is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot: matplotlib is not installed, no plots written (pip install matplotlib)"

    epochs = [record.epoch for record in result.training.history]
    for quantity in ("loss", "accuracy"):
        figure, axes = plt.subplots(figsize=(5, 3.5))
        for split in ("train", "validation"):
            values = [getattr(record, f"{split}_{quantity}") for record in result.training.history]
            axes.plot(epochs, values, marker="o", label=split)
        axes.set_xlabel("epoch")
        axes.set_ylabel(quantity)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / f"{quantity}.png", dpi=120)
        plt.close(figure)
    for split, report in result.reports.items():
        figure, axes = plt.subplots(figsize=(4, 3.5))
        axes.imshow(report.confusion_matrix, cmap="Blues")
        names = report.label_names
        axes.set_xticks(range(len(names)), names)
        axes.set_yticks(range(len(names)), names)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        for i, row in enumerate(report.confusion_matrix):
            for j, count in enumerate(row):
                axes.text(j, i, str(count), ha="center", va="center")
        axes.set_title(f"{split}: accuracy {report.accuracy:.2%}")
        figure.tight_layout()
        figure.savefig(out / f"confusion_matrix_{split}.png", dpi=120)
        plt.close(figure)
    return f"plots written: loss.png, accuracy.png, confusion_matrix_*.png in {out}"


# --------------------------------------------------------------------------- --compare


def comparison_rows(results: list[RunResult]) -> list[dict]:
    rows = []
    for result in results:
        test = result.reports["test"]
        rows.append({
            "strategy": result.strategy,
            "trainable_parameters": int(result.parameters["trainable"]),
            "training_seconds": result.training_seconds,
            "train_accuracy": result.reports["train"].accuracy,
            "validation_accuracy": result.reports["validation"].accuracy,
            "test_accuracy": test.accuracy,
            "positive_class": test.label_names[-1],
            "test_precision": test.precision[-1],
            "test_recall": test.recall[-1],
            "test_f1": test.f1[-1],
        })
    return rows


def format_comparison(rows: list[dict]) -> str:
    """One table: what each strategy costs (parameters, time) and what it buys (accuracy, P/R/F1)."""
    positive = rows[0]["positive_class"]
    header = ["strategy", "trainable params", "train time", "train acc", "val acc", "test acc",
              f"test P ({positive})", f"test R ({positive})", f"test F1 ({positive})"]
    table = [[
        row["strategy"], f"{row['trainable_parameters']:,}", f"{row['training_seconds']:.1f} s",
        *(f"{row[key]:.2%}" for key in ("train_accuracy", "validation_accuracy", "test_accuracy")),
        *(f"{row[key]:.4f}" for key in ("test_precision", "test_recall", "test_f1")),
    ] for row in rows]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [header, *table]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the output folder


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out` that becomes `out` only when everything in it is written:
    an error or Ctrl-C leaves no half-written run. Creating it first also proves `out` is
    writable before any training starts."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: already exists and is not empty; choose a new folder")
    missing = [parent for parent in [out.parent, *out.parent.parents] if not parent.exists()]
    staging = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write there ({error.strerror or error})") from None
    try:
        yield staging
        if out.exists():
            out.rmdir()  # an empty folder, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in missing:  # nearest first: remove the folders made for this run
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


# --------------------------------------------------------------------------- the main job


def describe_data(splits: data.Splits, tokens: TokenizedSplits, cfg: TrainConfig) -> str:
    counts = " / ".join(f"{name} {len(dataset):,}" for name, dataset in tokens.items())
    truncated = sum(dataset.num_truncated for _, dataset in tokens.items())
    return (
        f"1. labelled text: {cfg.data or 'SMS Spam Collection'} ({'balanced' if cfg.balanced else 'all data'}): "
        f"{counts}; classes {', '.join(splits.label_names)}\n"
        f"2. tokenization: GPT-2 BPE, max_length {tokens.max_length} tokens, "
        f"{truncated} text{'s' if truncated != 1 else ''} cut to fit"
    )


def log_reports(result: RunResult, tokens: TokenizedSplits, log: Log) -> None:
    """The chapter's evaluation for every split, then what the training cost."""
    for name, report in result.reports.items():
        log(f"\n{name} ({len(getattr(tokens, name)):,} texts), loss {result.losses[name]:.4f}\n"
            + metrics.format_report(report))
    parameters = result.parameters
    log(f"{result.strategy}: trained in {result.training_seconds:.1f} s; trainable parameters "
        f"{parameters['trainable']:,} of {parameters['total']:,} ({parameters['share']:.2%})")


def quiet(message: str) -> None:
    """The log of every process but rank 0."""


def batch_description(cfg: TrainConfig, runtime: Runtime) -> str:
    if not runtime.distributed:
        return f"batch size {cfg.batch_size}"
    return (f"batch size {cfg.batch_size} (the global batch: texts per weight update, shared by "
            f"{runtime.world_size} processes, about {cfg.batch_size / runtime.world_size:g} each)")


@contextlib.contextmanager
def main_process_output(out: Path, runtime: Runtime) -> Iterator[Path | None]:
    """staged_output on rank 0 alone; the other processes write nothing (None). Every process
    learns whether rank 0 could create it before any work starts."""
    with contextlib.ExitStack() as stack:
        yield together(runtime, (lambda: stack.enter_context(staged_output(out))) if runtime.is_main_process else None)


def load_text_and_tokens(cfg: TrainConfig, model_shape: gpt.GPTConfig) -> tuple[data.Splits, TokenizedSplits]:
    """Steps 1 and 2."""
    splits = load_labelled_text(cfg)
    tokenizer = data.get_tokenizer("gpt2")
    return splits, tokenize(splits, tokenizer, cfg.max_length, model_shape.context_length)


def run(cfg: TrainConfig, argv: list[str], log: Log) -> int:
    """The main job: check the arguments, then the seven steps for each strategy, evaluation,
    and the run folder (written only when complete). Under torchrun every process runs this;
    rank 0 alone prints and writes."""
    started = time.perf_counter()
    model_shape = check_config(cfg)
    runtime = start_runtime(cfg.device)
    log = log if runtime.is_main_process else quiet
    if runtime.distributed:
        log(f"torchrun: {runtime.world_size} processes train together ({dist.get_backend()}, "
            f"DistributedDataParallel), rank 0 on {runtime.device}")
    try:
        exit_code = train_and_write(cfg, model_shape, argv, runtime, log, started)
    except BaseException:
        stop_runtime(runtime)
        raise
    stop_runtime(runtime, wait_for_others=True)
    return exit_code


def train_and_write(
    cfg: TrainConfig, model_shape: gpt.GPTConfig, argv: list[str], runtime: Runtime, log: Log, started: float
) -> int:
    """Steps 1-7 for each strategy, the evaluation and the run folder (rank 0 alone writes it)."""
    out = Path(cfg.out) if cfg.out else default_out_dir()
    with main_process_output(out, runtime) as staging:
        splits, tokens = load_in_turn(runtime, lambda: load_text_and_tokens(cfg, model_shape))  # steps 1-2
        log(describe_data(splits, tokens, cfg))
        gpt_model = load_in_turn(runtime, lambda: load_gpt(cfg, model_shape))  # step 3
        log(f"3. GPT: {cfg.model}, {'pretrained' if cfg.init == 'pretrained' else 'random'} weights, "
            f"{sum(p.numel() for p in gpt_model.parameters()):,} parameters, on {runtime.device}")
        label_names = splits.label_names
        initial = build_classifier(gpt_model, len(label_names), cfg.pooling, cfg.seed)  # steps 4-5
        log(f"4. representation: pooling {cfg.pooling!r}; 5. classification head: "
            f"Linear({model_shape.emb_dim} -> {len(label_names)})")
        log(f"6. supervised loss: cross-entropy; 7. weight update: AdamW lr {cfg.lr:g}, weight decay "
            f"{cfg.weight_decay:g}, {batch_description(cfg, runtime)}, "
            f"{cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''}")

        results = []
        for strategy in cfg.compare or [cfg.strategy]:
            model, result = run_strategy(initial, tokens, label_names, cfg, strategy, runtime, log)
            results.append(result)
            log_reports(result, tokens, log)
            if staging is None:  # not rank 0
                continue
            run_dir = staging / strategy if cfg.compare else staging
            run_dir.mkdir(exist_ok=True)
            model.cpu()
            classify.save_classifier(model, run_dir, label_names, tokens.max_length)
            del model
            document = metrics_document(result, cfg, argv, tokens, label_names, model_shape, runtime,
                                        time.perf_counter() - started)
            write_json(run_dir / "metrics.json", document)
            if cfg.plot:
                log(write_plots(result, run_dir))
        if cfg.compare and staging is not None:
            rows = comparison_rows(results)
            write_json(staging / "compare.json", {"rows": rows, "arguments": {"argv": argv, "config": asdict(cfg)}})
            log("\n" + format_comparison(rows))
    log(f"\ntotal time {time.perf_counter() - started:.1f} s; written to {out}")
    return 0


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    label = process_label()  # '[rank 1] ' under torchrun: every process reports its own failure

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        return run(config_from_args(args), argv, log)
    except BrokenPipeError:  # the output went to a pipe that closed (`| head`): stop quietly
        return 1
    except ConnectionError as error:
        print(f"{label}error: {one_line(error)}; {OFFLINE_HINT}", file=sys.stderr)
    except (ValueError, OSError) as error:
        print(f"{label}error: {one_line(error)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{label}interrupted: no run folder was written", file=sys.stderr)
        return 130
    except (OtherProcessFailed, StoppedByTorchrun) as error:
        # another process failed and said why; rank 0 says that this one stopped
        if label == "[rank 0] ":
            print(f"{label}{one_line(error)}", file=sys.stderr)
    except Exception as error:
        if label:  # a bug or out of memory on one process: name it, then the traceback
            print(f"{label}error: {type(error).__name__}: {one_line(error)}", file=sys.stderr, flush=True)
        raise
    return 2


if __name__ == "__main__":
    sys.exit(main())
