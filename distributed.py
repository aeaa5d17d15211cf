"""Where training runs: the device, and data-parallel training under torchrun. Machinery the
chapter never mentions.

`torchrun --nproc_per_node=N train.py ...` starts N processes that train one model together
(README "Scaling out"); without torchrun this is one process, rank 0 of 1, and nothing here
does anything. It enters train.py at two seams, as in nanoGPT:

- `shard`: every process draws the same batches (one seed) and trains on its share of each,
  every N-th text, so --batch-size stays the texts per weight update;
- `wrap`: DistributedDataParallel around the classifier. Each process's loss is the plain mean
  over its share (train.supervised_loss); DDP's communication hook weights each process's
  gradient by its share of the batch (its texts / the batch's; with class weights, its texts'
  weight / the batch's) and sums them: the gradient of the whole batch's mean loss, as in one
  process, also when a batch does not divide evenly.

The rest keeps the processes in step: rank 0 loads first (`load_in_turn`: it downloads while
the others wait), a failure on any process stops them all (`together`), and epoch statistics
are summed over the processes (`Runtime.sum`). Evaluation and the frozen-prefix cache need no
help: every process computes them whole, and the same weights give the same numbers.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# How long a process waits in a collective for the others before it gives up: long enough for rank 0
# to download gpt2-xl (6 GB) while the others wait. torchrun stops every process as soon as one fails.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
Result = TypeVar("Result")


class OtherProcessFailed(RuntimeError):
    """Raised on the healthy processes when another one failed (it printed its own message)."""


class StoppedByTorchrun(RuntimeError):
    """SIGTERM: torchrun stops every process when one of them fails."""


@dataclass
class Runtime:
    """Where the computation happens: the device and this process's place among those that train
    one model together. One process alone is rank 0 of 1."""

    device: torch.device
    rank: int = 0  # rank 0 alone prints and writes
    world_size: int = 1
    local_rank: int = 0  # among the processes on this machine: its GPU
    share: float = 1.0  # this process's part of the batch being trained (`shard` sets it, `wrap` reads it)

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes; in one process, `tensor` itself."""
        if not self.distributed:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)  # every process receives the same sum
        return total


def pick_device(name: str | None) -> torch.device:
    """"auto" (or None): cuda, then mps, then cpu; else the named device, if this machine has it."""
    if name in (None, "auto"):
        available = [kind for kind in ("cuda", "mps") if _has(kind)]
        return torch.device(available[0] if available else "cpu")
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unknown device; choose auto, cuda, mps or cpu")
    if not _has(kind):
        raise ValueError(f"--device {name}: not available on this machine; use --device auto or cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: {error}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_precision(choice: str, device: torch.device) -> torch.dtype:
    """The dtype forward passes compute in under autocast (the weights stay float32).

    auto: bfloat16 on CUDA cards with bfloat16 hardware (compute capability 8.0 or more: A100,
    H100, RTX 30xx and later); float16, with a gradient scaler, on 7.x cards (T4, V100), whose
    tensor cores have no bfloat16 (PyTorch emulates it there, slower than float32, and
    torch.cuda.is_bf16_supported() says True all the same); float32 elsewhere (CPU, MPS, older
    cards). --precision names one instead; ValueError when the device cannot run it.
    """
    if choice != "auto" and choice not in PRECISIONS:
        raise ValueError(f"--precision {choice}: choose auto, {', '.join(PRECISIONS)}")
    major, minor = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    if choice == "auto":
        return torch.bfloat16 if major >= 8 else torch.float16 if major == 7 else torch.float32
    dtype = PRECISIONS[choice]
    if dtype == torch.bfloat16 and device.type == "cuda" and major < 8:
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} (compute capability "
                         f"{major}.{minor}) has no bfloat16 hardware; use fp16 (or auto) or fp32")
    if dtype != torch.float32 and device.type != "cuda" and not _autocast_runs(device, dtype):
        raise ValueError(f"--precision {choice}: this PyTorch cannot compute in {dtype} on {device.type}; use fp32")
    return dtype


def _autocast_runs(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unsupported dtype is a warning, then float32
            with torch.autocast(device.type, dtype=dtype):
                return (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype == dtype
    except (RuntimeError, TypeError):
        return False


def _has(kind: str) -> bool:
    return {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[kind]


def memory_bytes() -> float:
    """This machine's memory (inf where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return math.inf


def training_bytes(parameters: int, trainable: int, trained_blocks: int, emb_dim: int, n_heads: int,
                   micro_batch: int, tokens: int, precision: torch.dtype) -> int:
    """An estimate of a training step's peak GPU memory: the weights (float32), the trainable ones'
    gradients and AdamW's two moments (float32 each), and what backward keeps of the blocks that
    train: about (34 C + 5 H T) bytes per token and block in 16-bit precision (Korthikanti et al.,
    2022, "Reducing Activation Recomputation in Large Transformer Models"), twice that in float32."""
    kept = micro_batch * tokens * trained_blocks * (34 * emb_dim + 5 * n_heads * tokens)
    return (parameters + 3 * trainable) * 4 + kept * (2 if precision == torch.float32 else 1)


def process_label() -> str:
    """'[rank 1] ' under torchrun, '' in one process: prefixes the messages printed on stderr."""
    return f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def start(device_name: str) -> Runtime:
    """The device to compute on. Under torchrun (WORLD_SIZE > 1) also join the process group:
    NCCL between GPUs (this process takes cuda:LOCAL_RANK), gloo between CPU processes."""
    device = pick_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
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

    def stop_by_torchrun(signum, frame):
        raise StoppedByTorchrun("stopped by torchrun (another process failed: see its message)")

    signal.signal(signal.SIGTERM, stop_by_torchrun)  # an exception, so that the run folder is cleaned up
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                            timeout=PROCESS_GROUP_TIMEOUT)
    return Runtime(device, rank, world_size, local_rank)


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
    flags = torch.zeros(runtime.world_size, device=runtime.device)  # (world_size,)
    flags[runtime.rank] = float(error is not None)
    failed = [rank for rank, flag in enumerate(runtime.sum(flags).tolist()) if flag]
    if error is not None:
        raise error
    if failed:
        raise OtherProcessFailed(f"stopped: rank {', '.join(map(str, failed))} failed "
                                 f"(see the message{'s' if len(failed) > 1 else ''} above)")
    return result


def load_in_turn(runtime: Runtime, load: Callable[[], Result]) -> Result:
    """Run `load` on every process, rank 0 first: it downloads whatever is missing (data, BPE
    files, weights) while the others wait, so no two downloads race on one cache; then the first
    process of each other machine (its own cache, where machines share no disk); then the rest,
    from the cache. A failure in any turn stops them all."""
    if not runtime.distributed:
        return load()
    my_turn = 0 if runtime.rank == 0 else 1 if runtime.local_rank == 0 else 2
    for turn in range(3):
        loaded = together(runtime, load if turn == my_turn else None)
        if turn == my_turn:
            result = loaded
    return result


# --------------------------------------------------------------------------- the two seams


def shard(batches: Iterable[list[int]], runtime: Runtime, weights: Sequence[float] | None = None
          ) -> Iterator[tuple[list[int], int]]:
    """This process's share of each batch, with the whole batch's size: every world_size-th text
    of a batch sorted by length, so the shares cost alike. A share may be empty when a batch has
    fewer texts than processes; it still takes part in the gradient exchange, weighing nothing.
    One process: every batch whole. `weights`: each text's weight in the loss (its class's,
    --class-weights), whose mean is then weighted: a share weighs its part of the batch's weight."""
    for indices in batches:
        mine = indices[runtime.rank :: runtime.world_size]
        if weights is None:
            runtime.share = len(mine) / len(indices)  # what `wrap`'s hook weighs this process's gradient by
        else:
            runtime.share = sum(weights[i] for i in mine) / sum(weights[i] for i in indices)
        yield mine, len(indices)


def _weighted_sum(runtime, bucket):  # no annotations: DDP checks them, and this file's are strings
    """DDP communication hook: each process's gradient weighted by its share (`shard`), then summed
    over the processes, where DDP's default averages them."""
    weighted = bucket.buffer().mul_(runtime.share)
    return dist.all_reduce(weighted, async_op=True).get_future().then(lambda future: future.value()[0])


def wrap(network: nn.Module, runtime: Runtime) -> nn.Module:
    """One process: `network` itself. Under torchrun: DistributedDataParallel around it, which
    copies rank 0's weights to every process when built and, during backward, adds up the
    trainable parameters' gradients, each process's weighted by its share of the batch. Wrap
    again whenever the trainable set changes (gradual): every process does so at the same epoch."""
    if not runtime.distributed:
        return network
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    wrapped = DistributedDataParallel(network, device_ids=device_ids)  # the model has no buffers to sync
    wrapped.register_comm_hook(runtime, _weighted_sum)
    return wrapped


def held(network: nn.Module, hold: bool) -> contextlib.AbstractContextManager:
    """With gradient accumulation, every micro-batch of an update but the last keeps its gradients
    on this process (DDP's no_sync): they are exchanged once, with the last. One process: nothing."""
    return network.no_sync() if hold and isinstance(network, DistributedDataParallel) else contextlib.nullcontext()


@contextlib.contextmanager
def session(device_name: str) -> Iterator[Runtime]:
    """`start`, then leave the process group however the run ends. After a success, first wait until
    every process got here, so none tears the group down while another still exchanges with it
    (gloo then aborts the process); after a failure, don't wait: another process may never arrive."""
    runtime = start(device_name)
    try:
        yield runtime
        if runtime.distributed:
            dist.barrier()
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()
