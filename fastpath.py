"""Frozen blocks computed once: the machinery behind a step of "Congelamento de Camadas".

When the embeddings and the first k blocks are frozen and dropout is 0, their output for a text
never changes during training, so train.fine_tune has every text run through them once
(`refresh_caches`) and `classify.GPTClassifier.forward(stored, lengths, start_block=k)`
continues from there at every step. This module keeps that output (`PrefixCache`: the real
positions only, float32 within a memory budget, else float16, else nothing), rebuilds it when the
boundary moves (the "gradual" strategy), shares it among the runs of a comparison
(`share_frozen_work`: nested boundaries in one pass, each deeper one from the one below,
`PrefixCache.deepen`), and hands the trainer its batches (`SplitInputs`). --no-cache turns it
off: token ids, every block at every step. tests/test_fastpath.py proves the numbers equal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import classify
import data
import report

CACHE_MEMORY_BUDGET = 2**30  # bytes, for all splits together
Progress = Callable[[int], None]  # told how many more tokens are done


# --------------------------------------------------------------------------- the frozen-prefix cache


def _has_dropout(model: nn.Module) -> bool:
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    rates += [m.drop_rate for m in model.modules() if hasattr(m, "drop_rate")]  # attention's, inside SDPA
    return any(rate > 0 for rate in rates)


def frozen_prefix_length(model: classify.GPTClassifier) -> int | None:
    """k such that the embeddings and blocks[:k] are frozen and dropout is 0: their output for a
    given text never changes during training, so it can be computed once (`PrefixCache`).

    None when there is nothing worth caching: dropout is on, the embeddings train ("all"), or the
    first block already trains (including "lora", whose adapters sit in every block).
    """
    trains = classify.trains
    if _has_dropout(model) or trains(model.gpt.wte) or trains(model.gpt.wpe):
        return None
    k = 0
    while k < len(model.gpt.h) and not trains(model.gpt.h[k]):
        k += 1
    return k or None


def _stores_one_position(model: classify.GPTClassifier, start_block: int) -> bool:
    """Whether the trainable top reads one position per text only: always for "first" pooling,
    and for last-token pooling when every block is frozen."""
    return model.pooling == "first" or (model.pooling in ("last", "special") and start_block == len(model.gpt.h))


@dataclass
class PrefixCache:
    """The outputs of the frozen blocks[:start_block], computed once per text.

    Each text runs through them once, at its own length, and only the positions the trainable top
    reads are stored, with no padding: every real position in general (the trainable blocks need
    all keys and values); only the last one for last-token pooling when every block is frozen
    (then only ln_f, which acts per position, and the head remain; the last block itself runs
    only there); only position 0 for "first" pooling. Storage is float32 when it fits the memory
    budget, else float16 (if that fits and every value is finite); `build` returns None when
    neither fits, and the trainer goes without. `deepen` extends a cache by more frozen blocks.
    """

    states: torch.Tensor  # (stored positions, C), on the device
    offsets: torch.Tensor  # (N,) long, on the CPU: where text i starts in states
    lengths: torch.Tensor  # (N,) long, on the CPU: how many positions text i stores
    start_block: int
    order: list[int] = field(default_factory=list)  # the texts by length, in the chunks they ran in

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.states.dtype

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def build(cls, model: classify.GPTClassifier, token_ids: list[list[int]], start_block: int,
              device: torch.device | str, memory_budget_bytes: int = CACHE_MEMORY_BUDGET,
              batch_size: int = 64, progress: Progress | None = None) -> PrefixCache | None:
        if not 0 <= start_block <= (frozen_prefix_length(model) or 0):
            raise ValueError(f"start_block {start_block}: the embeddings and blocks[:{start_block}] must be frozen "
                             f"and dropout 0 for their outputs to be cached (use frozen_prefix_length(model))")
        one_position = _stores_one_position(model, start_block)
        extra = model.pooling == "special"  # the appended <|endoftext|> is stored too
        lengths = torch.tensor([1 if one_position else len(ids) + extra for ids in token_ids], dtype=torch.long)
        model_device = next(model.parameters()).device

        def first_input(chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            batch = data.collate([(token_ids[i], 0) for i in chunk]).to(model_device)
            return model.embed(batch.token_ids, batch.lengths)  # (B, T, C), (B,)

        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        return cls._run_blocks(model, first_input, order, lengths, 0, start_block, device, memory_budget_bytes,
                               batch_size, progress)

    def deepen(self, model: classify.GPTClassifier, start_block: int, memory_budget_bytes: int = CACHE_MEMORY_BUDGET,
               batch_size: int = 64, progress: Progress | None = None) -> PrefixCache | None:
        """The cache at a deeper frozen boundary, computed from this one: only
        blocks[self.start_block:start_block] run, over the stored states; the embeddings and the
        blocks below are not run again. Equal to `build` at `start_block` to the last bit: the
        texts run in the same chunks, with the same shapes, and under the causal mask a real
        position never reads the zeros that pad the stored states (tests/test_fastpath.py)."""
        if not self.start_block < start_block <= len(model.gpt.h):
            raise ValueError(f"start_block {start_block}: must be deeper than this cache's {self.start_block} and at "
                             f"most {len(model.gpt.h)} (the model's blocks)")
        if (frozen_prefix_length(model) or 0) < start_block:
            raise ValueError(f"start_block {start_block}: blocks[:{start_block}] must be frozen and dropout 0")
        if self.dtype != torch.float32 or (_stores_one_position(model, self.start_block) and model.pooling != "first"):
            raise ValueError("only a float32 cache of every position can be deepened (a float16 one would round "
                             "twice; the last position alone lacks the keys and values the next block needs)")
        one_position = _stores_one_position(model, start_block)
        lengths = torch.ones_like(self.lengths) if one_position else self.lengths
        model_device = next(model.parameters()).device

        def first_input(chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            hidden, text_lengths = self.batch(chunk)  # (B, T, C), (B,)
            return hidden.to(model_device), text_lengths.to(model_device)

        return self._run_blocks(model, first_input, self.order, lengths, self.start_block, start_block,
                                self.states.device, memory_budget_bytes, batch_size, progress)

    @classmethod
    def _run_blocks(cls, model: classify.GPTClassifier, first_input, order: list[int], lengths: torch.Tensor,
                    first_block: int, start_block: int, device: torch.device | str, memory_budget_bytes: int,
                    batch_size: int, progress: Progress | None) -> PrefixCache | None:
        """Run blocks[first_block:start_block] over `first_input(chunk)` for each chunk of texts
        (in `order`, by length) and store the positions `lengths` says; `progress(n)` after each
        chunk of texts holding n tokens."""
        offsets = torch.cumsum(lengths, dim=0) - lengths  # (N,)
        rows, emb_dim = int(lengths.sum()), model.gpt.cfg.emb_dim
        dtype = next((d for d in (torch.float32, torch.float16) if rows * emb_dim * d.itemsize <= memory_budget_bytes),
                     None)
        if dtype is None:
            return None
        states = torch.empty(rows, emb_dim, dtype=dtype, device=device)  # (rows, C)
        blocks = list(model.gpt.h)[first_block:start_block]
        last_only = _stores_one_position(model, start_block) and bool(blocks) and model.pooling != "first"
        with torch.no_grad():
            for chunk_start in range(0, len(order), batch_size):
                chunk = order[chunk_start : chunk_start + batch_size]
                hidden, text_lengths = first_input(chunk)  # (B, T, C), (B,)
                for block in blocks[:-1] if last_only else blocks:
                    hidden = block(hidden)  # (B, T, C)
                if last_only:
                    hidden = classify.last_position_block(blocks[-1], hidden, text_lengths)[:, None]  # (B, 1, C)
                for row, i in enumerate(chunk):
                    offset, length = int(offsets[i]), int(lengths[i])
                    states[offset : offset + length] = hidden[row, :length].to(device, dtype)
                if progress is not None:
                    progress(int(text_lengths.sum()))  # the work grows with the tokens
        if dtype == torch.float16 and not bool(torch.isfinite(states).all()):
            return None  # a value beyond float16's range: caching would change the results
        return cls(states, offsets, lengths, start_block, order)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored hidden states of these texts, padded with zeros on the right: (B, T, C)
        float32 and lengths (B,), both on the cache's device."""
        index = torch.as_tensor(indices, dtype=torch.long)  # (B,)
        lengths = self.lengths[index]  # (B,)
        positions = torch.arange(max(int(lengths.max()) if len(indices) else 1, 1))  # (T,)
        real = positions < lengths[:, None]  # (B, T)
        rows = torch.where(real, self.offsets[index][:, None] + positions, 0)  # (B, T) rows of states
        device = self.states.device
        hidden = self.states[rows.to(device)].float()  # (B, T, C)
        return hidden.masked_fill(~real.to(device)[..., None], 0.0), lengths.to(device)


# --------------------------------------------------------------------------- one split, ready for the model


@dataclass
class Batch:
    """What a step feeds the classifier, on the device: `inputs` are token ids (B, T), or the
    frozen blocks[:start_block]'s stored output (B, T, C); the real lengths; the labels."""

    inputs: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    start_block: int


@dataclass
class SplitInputs:
    """One split's texts, labels and, while the frozen blocks allow it, their stored output
    (`cache`); `shelf` holds the outputs computed beforehand for several runs
    (`share_frozen_work`), by the number of frozen blocks."""

    dataset: data.ClassificationDataset
    cache: PrefixCache | None = None
    shelf: dict[int, PrefixCache] = field(default_factory=dict)

    def batch(self, indices: list[int], device: torch.device) -> Batch:
        labels = torch.tensor([self.dataset.labels[i] for i in indices], dtype=torch.long, device=device)  # (B,)
        if self.cache is not None:
            hidden, lengths = self.cache.batch(indices)  # (B, T, C), (B,)
            return Batch(hidden.to(device), lengths.to(device), labels, self.cache.start_block)
        if not indices:  # a process's empty share of a batch (distributed.py): no text, but a valid shape
            empty = torch.zeros(0, 1, dtype=torch.long, device=device)
            return Batch(empty, torch.zeros(0, dtype=torch.long, device=device), labels, 0)
        batch = data.collate([self.dataset[i] for i in indices]).to(device)
        return Batch(batch.token_ids, batch.lengths, labels, 0)


@dataclass
class CacheStatus:
    """What the frozen-prefix cache does in this run, for the log and metrics.json."""

    used: bool
    start_block: int | None = None
    nbytes: int = 0
    dtype: str | None = None
    seconds: float = 0.0
    reason: str = ""
    shared: bool = False  # taken from the frozen work done once for several runs


def refresh_caches(model: classify.GPTClassifier, splits: dict[str, SplitInputs], device: torch.device,
                   enabled: bool = True, tell: report.Log = report.quiet) -> CacheStatus:
    """Store what the frozen blocks compute, for every split, so that batches carry it instead of
    token ids; rebuilt only when the boundary between frozen and trainable blocks moved (the
    "gradual" strategy moves it every epoch), and taken from a split's shelf when the frozen work
    was done beforehand. `enabled` False (--no-cache): token ids, every block at every step.
    `tell` hears how the build goes, with the time left, when it takes more than a moment."""
    if not enabled:
        for split in splits.values():
            split.cache = None
        return CacheStatus(used=False, reason="--no-cache")
    start_block = frozen_prefix_length(model)
    started, caches, shelved = time.perf_counter(), {}, set()
    if start_block:
        total_tokens = sum(sum(split.dataset.lengths) for split in splits.values())
        ticker = report.Ticker("frozen-prefix cache", total_tokens, tell)
        for name, split in splits.items():
            if split.cache is not None and split.cache.start_block == start_block:
                caches[name] = split.cache
                continue
            split.cache = None  # free the old cache before building the new one
            if start_block in split.shelf:
                caches[name] = split.shelf[start_block]
                shelved.add(name)
                continue
            budget = CACHE_MEMORY_BUDGET * sum(split.dataset.lengths) // max(total_tokens, 1)
            caches[name] = PrefixCache.build(model, split.dataset.token_ids, start_block, device, budget,
                                             progress=ticker.add)
    fits = bool(caches) and all(cache is not None for cache in caches.values())
    for name, split in splits.items():
        split.cache = caches[name] if fits else None
    if not fits:
        reason = (f"does not fit in {CACHE_MEMORY_BUDGET / 2**30:.0f} GiB" if start_block else
                  "no frozen block before the trainable ones, or dropout > 0")
        return CacheStatus(used=False, reason=reason)
    return CacheStatus(True, start_block, sum(cache.nbytes for cache in caches.values()),
                       str(next(iter(caches.values())).dtype).removeprefix("torch."), time.perf_counter() - started,
                       shared=shelved == set(splits))


# --------------------------------------------------------------------------- frozen work shared by several runs


def planned_prefix_lengths(model: classify.GPTClassifier, strategies: Sequence[str], epochs: int) -> list[int]:
    """The frozen-prefix lengths (`frozen_prefix_length`) that training `model` under each of
    `strategies` for `epochs` epochs will ask for, read from the strategies' names: blocks below
    the trainable ones, at every epoch of "gradual"; none for "all" and "lora" (the embeddings,
    or adapters in every block, train) nor with dropout."""
    if _has_dropout(model):
        return []
    n_layers, lengths = len(model.gpt.h), set()
    for name in strategies:
        kind = classify.parse_strategy(name).kind
        for epoch in range(epochs if kind == "gradual" else 1):
            frozen = n_layers - classify.trainable_blocks(name, n_layers, epoch)
            if kind not in ("all", "lora") and frozen > 0:
                lengths.add(frozen)
    return sorted(lengths)


@dataclass
class SharedPrefix:
    """The frozen work of several runs, done once: per split, a cache for each frozen-prefix
    length, to put on the splits' shelves (`SplitInputs.shelf`)."""

    caches: dict[str, dict[int, PrefixCache]]  # split name -> prefix length -> cache
    steps: list[str]  # what was computed, in order, for the log
    seconds: float

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for shelf in self.caches.values() for cache in shelf.values())

    def describe(self) -> str:
        if not self.steps:
            return "frozen work shared by the runs: none (no strategy freezes a block, or dropout > 0)"
        return (f"frozen work, done once for every run: {'; then '.join(self.steps)}; "
                f"{self.nbytes / 2**20:.1f} MiB kept, {self.seconds:.1f} s in all")


def share_frozen_work(model: classify.GPTClassifier, datasets: dict[str, data.ClassificationDataset],
                      prefix_lengths: Sequence[int], device: torch.device,
                      tell: report.Log = report.quiet) -> SharedPrefix:
    """What the frozen blocks compute, once for several runs that start from the same frozen
    weights (several strategies, several training seeds): strategies whose frozen prefixes nest
    (head over all blocks, last-block over all but one, ...) share one pass. The shallowest
    prefix runs from the token ids; each deeper one runs only the blocks between it and the one
    below (`PrefixCache.deepen`). `model`: the starting classifier, its blocks frozen."""
    started, total_tokens = time.perf_counter(), sum(sum(d.lengths) for d in datasets.values())
    caches: dict[str, dict[int, PrefixCache]] = {name: {} for name in datasets}
    steps, below = [], 0
    ticker = report.Ticker("frozen work for every run", total_tokens * len(set(prefix_lengths)), tell)
    for start_block in sorted(set(prefix_lengths)):
        step_started, deepened = time.perf_counter(), True
        for name, dataset in datasets.items():
            budget = CACHE_MEMORY_BUDGET * sum(dataset.lengths) // max(total_tokens, 1)
            previous = caches[name].get(below)
            if previous is not None and previous.dtype == torch.float32:
                cache = previous.deepen(model, start_block, budget, progress=ticker.add)
            else:
                cache = PrefixCache.build(model, dataset.token_ids, start_block, device, budget, progress=ticker.add)
                deepened = False
            if cache is not None:
                caches[name][start_block] = cache
        blocks = range(below if deepened else 0, start_block)
        what = (f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}")
        what = what if deepened else f"embeddings and {what}"
        if _stores_one_position(model, start_block) and model.pooling != "first":
            what += " (the last at the last position only)"
        steps.append(f"{what} over {sum(len(d) for d in datasets.values()):,} texts "
                     f"({time.perf_counter() - step_started:.1f} s)")
        below = start_block
    return SharedPrefix(caches, steps, time.perf_counter() - started)
