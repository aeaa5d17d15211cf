"""From GPT to classifier: head, text representation, fine-tuning strategies, save/load, inference.

Chapter 06, sections "Classification Head", "Como escolher a representação do texto",
"Estratégias de Fine-Tuning", "Congelamento de Camadas" and "Inferência e uso prático do modelo".
Steps 4 and 5 of the chapter's pipeline (representation, classification head), what step 7
(weight update) may touch, and the use of the trained model on new texts.

The file reads in that order:
  1. the classifier: GPT-2's blocks, then one vector per text (pooling), then Linear(C, K);
  2. fine-tuning strategies: which parameters train (head, last-block, last-N-blocks, all,
     gradual, lora) and the LoRA adapters;
  3. fast paths, each proven equal to the plain path by tests/test_classify.py: the final block
     computed only at the position the head reads, and the cache of the frozen blocks' outputs;
  4. save and load a trained classifier (a folder: classifier.safetensors + config.json);
  5. predict, and the command line: `python classify.py --model RUN_DIR "text" ...`.
"""

from __future__ import annotations

import warnings

# torch warns at import when NumPy is missing; this project does not use NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import data
from gpt import Block, GPTConfig, GPTModel, atomic_open, read_safetensors, write_safetensors

POOLINGS = ("last", "mean", "first")


# --------------------------------------------------------------------------- 1. the classifier


def last_token_index(lengths: torch.Tensor) -> torch.Tensor:
    """Index of each sequence's last real token.

    Under a causal mask only the last position has seen the whole text, which is why the
    chapter classifies from it (section "Como escolher a representação do texto").
    """
    return lengths - 1  # (B,)


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per text from its hidden states (B, T, C) -> (B, C).

    Padding sits on the right, after each text's `lengths[b]` real tokens:
    - "last": the last real token, the chapter's choice: the only position whose attention
      has read every token of the text;
    - "mean": the mean over real tokens (pads are masked out);
    - "first": position 0, which under the causal mask has seen only the first token; kept
      for the comparison that shows why "last" wins.
    """
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # (B,)
        return hidden[rows, last_token_index(lengths)]  # (B, C)
    if pooling == "mean":
        num_tokens = hidden.shape[1]
        real = torch.arange(num_tokens, device=hidden.device) < lengths[:, None]  # (B, T)
        summed = hidden.masked_fill(~real[..., None], 0.0).sum(dim=1)  # (B, C)
        return summed / lengths[:, None].to(hidden.dtype)  # (B, C)
    if pooling == "first":
        return hidden[:, 0]  # (B, C)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


class GPTClassifier(nn.Module):
    """GPT-2 whose vocabulary head is replaced by a classification head Linear(C, K).

    `forward(token_ids (B, T), lengths (B,))` returns class logits (B, K). Texts are padded
    on the right; with the causal mask a real position never attends to a pad after it, so
    no attention mask is needed and padding never changes a prediction. The GPT's own
    `lm_head` (C -> 50,257 vocabulary logits, the largest matrix product of the model) is
    never computed.

    `last_position_only` (on by default) selects the fast path for "last" pooling, which
    computes the final block only where the head reads it (`last_position_block`); off, the
    final block runs at every position, as in the chapter.
    """

    def __init__(self, gpt: GPTModel, num_classes: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if num_classes < 2:
            raise ValueError(f"num_classes {num_classes}: a classifier needs at least 2 classes")
        self.gpt = gpt
        self.head = nn.Linear(gpt.cfg.emb_dim, num_classes)  # the new classification head
        self.pooling = pooling
        self.last_position_only = True

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.gpt.embed(token_ids), lengths, start_block=0)  # (B, K)

    def forward_from(self, hidden: torch.Tensor, lengths: torch.Tensor, start_block: int) -> torch.Tensor:
        """Class logits (B, K), continuing from the output of blocks[:start_block].

        start_block 0: `hidden` is the embedding output; start_block n_layers: every block has
        run and only the final LayerNorm, the pooling and the head remain. `PrefixCache`
        feeds this with stored outputs of the frozen blocks.
        """
        n_layers = len(self.gpt.h)
        if not 0 <= start_block <= n_layers:
            raise ValueError(f"start_block {start_block}: must be in 0..{n_layers} (the model's blocks)")
        if self.pooling == "first":
            hidden = hidden[:, :1]  # (B, 1, C): position 0 never looks past itself, so drop the rest
        blocks = list(self.gpt.h)[start_block:]
        if self.pooling == "last" and self.last_position_only and blocks:
            for block in blocks[:-1]:
                hidden = block(hidden)  # (B, T, C)
            text = self.gpt.ln_f(last_position_block(blocks[-1], hidden, lengths))  # (B, C)
        else:
            for block in blocks:
                hidden = block(hidden)  # (B, T, C)
            text = pool(self.gpt.ln_f(hidden), lengths, self.pooling)  # (B, C)
        return self.head(text)  # (B, K)


# --------------------------------------------------------------------------- 2. fine-tuning strategies

STRATEGIES = ("head", "last-block", "last-N-blocks", "all", "gradual", "lora")
_LAST_N_BLOCKS = re.compile(r"last-(\d+)-blocks")


@dataclass(frozen=True)
class Strategy:
    """What fine-tuning trains (sections "Estratégias de Fine-Tuning", "Congelamento de Camadas").

    kind is "head", "last-blocks" (name "last-block" or "last-N-blocks"), "all", "gradual" or
    "lora"; num_blocks is N for "last-blocks".
    """

    name: str
    kind: str
    num_blocks: int = 0


def parse_strategy(name: str) -> Strategy:
    """"head", "last-block", "last-N-blocks" (e.g. "last-2-blocks"), "all", "gradual" or "lora"."""
    if name in ("head", "all", "gradual", "lora"):
        return Strategy(name, name)
    if name == "last-block":
        return Strategy(name, "last-blocks", 1)
    match = _LAST_N_BLOCKS.fullmatch(name)
    if match and int(match.group(1)) >= 1:
        return Strategy(name, "last-blocks", int(match.group(1)))
    raise ValueError(
        f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)} "
        f"(last-N-blocks with N a number of blocks, e.g. last-2-blocks)"
    )


def trainable_blocks(strategy: Strategy | str, n_layers: int, epoch: int = 0) -> int:
    """How many transformer blocks, counted from the top, train under `strategy` at `epoch`.

    "gradual" is the chapter's "liberar gradualmente": epoch 0 trains the head and the final
    LayerNorm only, and each later epoch unfreezes one more block from the top. "lora" trains
    adapters inside every block but no block's own weights, so it counts 0 here.
    """
    strategy = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    if epoch < 0:
        raise ValueError(f"epoch {epoch}: must be 0 or more")
    if strategy.kind == "last-blocks":
        if strategy.num_blocks > n_layers:
            raise ValueError(
                f"strategy {strategy.name}: the model has only {n_layers} blocks; "
                f"choose N in 1..{n_layers} (or 'all')"
            )
        return strategy.num_blocks
    if strategy.kind == "gradual":
        return min(epoch, n_layers)
    return n_layers if strategy.kind == "all" else 0


def apply_strategy(
    model: GPTClassifier, strategy: Strategy | str, epoch: int = 0, lora_rank: int = 8, lora_alpha: float = 16
) -> None:
    """Set `requires_grad` on every parameter as `strategy` says (for "gradual", at `epoch`).

    The head always trains; the final LayerNorm trains under every strategy but "head" (it
    normalises exactly the vector the head reads); the token and position embeddings train
    only under "all". "lora" inserts adapters on the first call (later calls keep them) and
    trains the adapters, the head and the final LayerNorm; every pretrained weight stays
    frozen. Build the optimizer from `trainable_parameters(model)` after this call, so that
    weight decay never moves a frozen weight.
    """
    strategy = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    has_adapters = any(isinstance(module, LoRALinear) for module in model.modules())
    if has_adapters and strategy.kind != "lora":
        raise ValueError(
            f"strategy {strategy.name}: this model carries LoRA adapters; save and load it "
            f"(which merges them) before training it with another strategy"
        )
    blocks = model.gpt.h
    num_unfrozen = trainable_blocks(strategy, len(blocks), epoch)
    model.requires_grad_(strategy.kind == "all")
    model.head.requires_grad_(True)
    if strategy.kind != "head":
        model.gpt.ln_f.requires_grad_(True)
    for block in blocks[len(blocks) - num_unfrozen :]:
        block.requires_grad_(True)
    if strategy.kind == "lora":
        add_lora(model, lora_rank, lora_alpha)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_A.requires_grad_(True)
                module.lora_B.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight (lm_head = wte) counts once."""
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    total = sum(param.numel() for param in model.parameters())
    return trainable, total


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets: only those that train."""
    return [param for param in model.parameters() if param.requires_grad]


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: y = W x + b + (alpha / r) B A x.

    A (r, in) starts random (Kaiming uniform, as nn.Linear's weight), B (out, r) starts at
    zero, so at insertion the layer computes exactly what the base layer did, and training
    moves only r * (in + out) numbers per layer instead of in * out. The base layer's
    `weight` and `bias` keep their names, so the checkpoint names do not change and merging
    is `weight + (alpha / r) B A` (`merged_weight`).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora rank {rank}: must be at least 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), pretrained
        self.register_parameter("bias", base.bias)  # (out,) or None
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))  # (out, r)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., out), through rank r
        return F.linear(x, self.weight, self.bias) + self.scale * update  # (..., out)

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A)  # (out, in)


LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # in every block


def add_lora(model: GPTClassifier, rank: int, alpha: float) -> None:
    """Wrap the attention and MLP projections of every block in `LoRALinear` (once)."""
    for block in model.gpt.h:
        for path in LORA_TARGETS:
            parent_name, layer_name = path.split(".")
            parent = getattr(block, parent_name)
            layer = getattr(parent, layer_name)
            if not isinstance(layer, LoRALinear):
                setattr(parent, layer_name, LoRALinear(layer, rank, alpha))


# --------------------------------------------------------------------------- 3. fast paths


def linear_outputs(layer: nn.Linear | LoRALinear, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """`layer(x)[..., start:stop]`, computing only those outputs (rows start:stop of the weight)."""
    bias = None if layer.bias is None else layer.bias[start:stop]
    out = F.linear(x, layer.weight[start:stop], bias)  # (..., stop - start)
    if isinstance(layer, LoRALinear):
        out = out + layer.scale * F.linear(F.linear(x, layer.lora_A), layer.lora_B[start:stop])
    return out


def last_position_block(block: Block, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`block(hidden)` at each text's last real position only: (B, T, C) -> (B, C).

    With "last" pooling the head reads one position per text. In the final block, keys and
    values are still needed at every position (the last token attends to all of them), but the
    query, the attention output, the residual, ln_2 and the MLP only at that one position: one
    query per text instead of T. The causal mask for that query is "positions <= last", which
    also hides the pads after the text. tests/test_classify.py proves it equals the full block.
    """
    attn = block.attn
    batch, num_tokens, emb_dim = hidden.shape
    rows = torch.arange(batch, device=hidden.device)  # (B,)
    last = last_token_index(lengths)  # (B,)
    normed = block.ln_1(hidden)  # (B, T, C)
    query = linear_outputs(attn.c_attn, normed[rows, last], 0, emb_dim)  # (B, C)
    keys, values = linear_outputs(attn.c_attn, normed, emb_dim, 3 * emb_dim).chunk(2, dim=-1)  # 2 x (B, T, C)
    query = query.view(batch, attn.n_heads, 1, attn.head_dim)  # (B, H, 1, hs)
    keys, values = attn.split_heads(keys), attn.split_heads(values)  # (B, H, T, hs)
    attn_scores = query @ keys.transpose(-2, -1) / math.sqrt(attn.head_dim)  # (B, H, 1, T)
    visible = torch.arange(num_tokens, device=hidden.device) <= last[:, None]  # (B, T)
    attn_scores = attn_scores.masked_fill(~visible[:, None, None, :], float("-inf"))  # (B, H, 1, T)
    attn_weights = attn.attn_dropout(torch.softmax(attn_scores, dim=-1))  # (B, H, 1, T)
    context = (attn_weights @ values).reshape(batch, emb_dim)  # (B, C), heads side by side
    x = hidden[rows, last] + attn.resid_dropout(attn.c_proj(context))  # (B, C)
    return x + block.mlp(block.ln_2(x))  # (B, C)


def _has_dropout(model: nn.Module) -> bool:
    drop_rates = [module.p for module in model.modules() if isinstance(module, nn.Dropout)]
    drop_rates += [module.drop_rate for module in model.modules() if hasattr(module, "drop_rate")]
    return any(rate > 0 for rate in drop_rates)


def trains(module: nn.Module) -> bool:
    """True when any parameter of `module` is trainable."""
    return any(param.requires_grad for param in module.parameters())


def _prefix_is_frozen(model: GPTClassifier, num_blocks: int) -> bool:
    """True when the embeddings and blocks[:num_blocks] have no trainable parameter."""
    return not any(trains(module) for module in [model.gpt.wte, model.gpt.wpe, *list(model.gpt.h)[:num_blocks]])


def frozen_prefix_length(model: GPTClassifier) -> int | None:
    """k such that the embeddings and blocks[:k] are frozen and dropout is 0: their output for
    a given text never changes during training, so it can be computed once (`PrefixCache`).

    None when there is nothing worth caching: dropout is on, the embeddings train ("all"), or
    the first block already trains (including "lora", whose adapters sit in every block: only
    the embedding lookup would be saved).
    """
    if _has_dropout(model) or not _prefix_is_frozen(model, 0):
        return None
    k = 0
    while k < len(model.gpt.h) and not trains(model.gpt.h[k]):
        k += 1
    return k or None


class PrefixCache:
    """The outputs of the frozen blocks[:start_block], computed once per example.

    The chapter's method recomputes the frozen blocks at every step of every epoch although
    their outputs never change. Here each example runs through them once, at its own length
    (examples sorted by length, so batches carry little padding), and only the positions the
    trainable top reads are stored, with no padding:
    - every real position, in general (the trainable blocks need all keys and values);
    - only the last real position for "last" pooling when every block is frozen (start_block
      == n_layers: only ln_f, which acts per position, and the head remain; the last block
      itself then runs only there, `last_position_block`);
    - only position 0 for "first" pooling.
    Storage is float32 when it fits `memory_budget_bytes`, else float16 (if that fits and
    every value is finite); `build` returns None when neither fits, and the caller trains
    without the cache. `batch(indices)` pads to the batch's longest and returns float32 on
    `device`, ready for `model.forward_from(hidden, lengths, cache.start_block)`; its lengths
    count the stored positions (all 1 in the one-position cases above).
    """

    def __init__(
        self, states: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, start_block: int
    ) -> None:
        self.states = states  # (total stored positions, C), on the device
        self.offsets = offsets  # (N,) long, on the CPU: where example i starts in states
        self.lengths = lengths  # (N,) long, on the CPU: how many positions example i stores
        self.start_block = start_block

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.states.dtype

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def build(
        cls,
        model: GPTClassifier,
        token_ids: list[list[int]],
        start_block: int,
        device: torch.device | str,
        memory_budget_bytes: int = 2**30,
        batch_size: int = 64,
    ) -> PrefixCache | None:
        """Run every example through the embeddings and blocks[:start_block] once and store the
        result on `device`; None when it does not fit `memory_budget_bytes` even in float16."""
        n_layers = len(model.gpt.h)
        if not 0 <= start_block <= n_layers:
            raise ValueError(f"start_block {start_block}: must be in 0..{n_layers} (the model's blocks)")
        if not _prefix_is_frozen(model, start_block) or _has_dropout(model):
            raise ValueError(
                f"start_block {start_block}: the embeddings and blocks[:{start_block}] must be frozen and "
                f"dropout 0 for their outputs to be cached (use frozen_prefix_length(model))"
            )
        empty = [i for i, ids in enumerate(token_ids) if not ids]
        if empty:
            raise ValueError(f"example {empty[0]} has no tokens; every text needs at least one")
        stored = [_stored_length(len(ids), model.pooling, start_block, n_layers) for ids in token_ids]
        lengths = torch.tensor(stored, dtype=torch.long)  # (N,)
        offsets = torch.cumsum(lengths, dim=0) - lengths  # (N,)
        num_rows, emb_dim = int(lengths.sum()), model.gpt.cfg.emb_dim
        dtype = next(
            (d for d in (torch.float32, torch.float16) if num_rows * emb_dim * d.itemsize <= memory_budget_bytes),
            None,
        )
        if dtype is None:
            return None
        states = torch.empty(num_rows, emb_dim, dtype=dtype, device=device)  # (rows, C)
        model_device = next(model.parameters()).device
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        with torch.no_grad():
            for chunk_start in range(0, len(order), batch_size):
                chunk = order[chunk_start : chunk_start + batch_size]
                batch = data.collate([(token_ids[i], 0) for i in chunk])
                hidden = _prefix_output(model, batch.token_ids.to(model_device), batch.lengths.to(model_device), start_block)
                for row, i in enumerate(chunk):
                    offset, length = int(offsets[i]), int(lengths[i])
                    states[offset : offset + length] = hidden[row, :length].to(device, dtype)
        if dtype == torch.float16 and not bool(torch.isfinite(states).all()):
            return None  # a value beyond float16's range: caching would change the results
        return cls(states, offsets, lengths, start_block)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored hidden states of these examples, padded with zeros on the right:
        (B, T, C) float32 and lengths (B,), both on the cache's device."""
        index = torch.as_tensor(indices, dtype=torch.long)  # (B,)
        lengths = self.lengths[index]  # (B,)
        positions = torch.arange(int(lengths.max()))  # (T,)
        real = positions < lengths[:, None]  # (B, T)
        rows = torch.where(real, self.offsets[index][:, None] + positions, 0)  # (B, T) rows of states
        device = self.states.device
        hidden = self.states[rows.to(device)].float()  # (B, T, C)
        hidden = hidden.masked_fill(~real.to(device)[..., None], 0.0)  # (B, T, C)
        return hidden, lengths.to(device)


def _stored_length(length: int, pooling: str, start_block: int, n_layers: int) -> int:
    """How many positions of one example the classifier's trainable top reads: one for "first"
    pooling, and for "last" pooling once every block is frozen; else all of them."""
    one_position = pooling == "first" or (pooling == "last" and start_block == n_layers)
    return 1 if one_position else length


def _prefix_output(model: GPTClassifier, token_ids: torch.Tensor, lengths: torch.Tensor, start_block: int) -> torch.Tensor:
    """The output of the embeddings and blocks[:start_block] at the stored positions: (B, T, C),
    or (B, 1, C) where `_stored_length` keeps one position."""
    hidden = model.gpt.embed(token_ids)  # (B, T, C)
    blocks = list(model.gpt.h)[:start_block]
    if model.pooling == "first":
        hidden = hidden[:, :1]  # (B, 1, C)
    if model.pooling == "last" and blocks and start_block == len(model.gpt.h):  # every block frozen
        for block in blocks[:-1]:
            hidden = block(hidden)  # (B, T, C)
        return last_position_block(blocks[-1], hidden, lengths)[:, None]  # (B, 1, C)
    for block in blocks:
        hidden = block(hidden)  # (B, T, C)
    return hidden


# --------------------------------------------------------------------------- 4. save and load

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "classifier.safetensors"
FORMAT = "gpt2-classifier"
FORMAT_VERSION = 1


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a saved classifier and prepare its input text."""

    gpt: GPTConfig
    label_names: list[str]
    pooling: str = "last"
    max_length: int = 1024  # longer texts keep their first max_length tokens
    tokenizer: str = "gpt2"

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "gpt": asdict(self.gpt),
            "num_classes": self.num_classes,
            "label_names": self.label_names,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_dict(cls, fields: dict) -> ClassifierConfig:
        """Rebuild from `to_dict`'s output; ValueError saying what is wrong."""
        if not isinstance(fields, dict) or fields.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} config (its 'format' field is not {FORMAT!r})")
        if fields.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format_version {fields.get('format_version')!r}; this classify.py reads version {FORMAT_VERSION}"
            )
        if not isinstance(fields.get("label_names"), list):
            raise ValueError(f"label_names {fields.get('label_names')!r}: expected a list of class names")
        try:
            config = cls(
                gpt=GPTConfig(**fields["gpt"]),
                label_names=[str(name) for name in fields["label_names"]],
                pooling=fields["pooling"],
                max_length=int(fields["max_length"]),
                tokenizer=fields["tokenizer"],
            )
        except KeyError as error:
            raise ValueError(f"field {error} is missing") from error
        except TypeError as error:
            raise ValueError(f"bad field: {error}") from error
        if config.num_classes < 2 or fields.get("num_classes") != config.num_classes:
            raise ValueError(
                f"num_classes {fields.get('num_classes')!r} and label_names {config.label_names}: "
                f"need one name per class, and at least 2 classes"
            )
        if len(set(config.label_names)) != config.num_classes:
            raise ValueError(f"label_names {config.label_names}: each class needs its own name")
        if config.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {config.pooling!r}; expected one of {', '.join(POOLINGS)}")
        if not 1 <= config.max_length <= config.gpt.context_length:
            raise ValueError(f"max_length {config.max_length}: must be in 1..{config.gpt.context_length}")
        return config


def classifier_tensors(model: GPTClassifier) -> dict[str, torch.Tensor]:
    """The weights to save, by name: LoRA adapters merged into plain weights, the unused
    vocabulary head (tied to wte) left out."""
    tensors = dict(model.state_dict())
    tensors.pop("gpt.lm_head.weight", None)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            del tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
            tensors[f"{name}.weight"] = module.merged_weight()
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}


def save_classifier(
    model: GPTClassifier, run_dir: str | Path, label_names: list[str], max_length: int | None
) -> None:
    """Write run_dir/classifier.safetensors and run_dir/config.json.

    A saved LoRA model is a plain classifier (adapters merged). Both files are written to a
    temporary file and renamed into place, and the old config.json is removed first: a crash
    leaves either the previous run or a folder `load_classifier` rejects as incomplete, never
    new weights beside an old config. max_length None means the model's context length.
    """
    if len(label_names) != model.num_classes:
        raise ValueError(f"{len(label_names)} label names {label_names} for a {model.num_classes}-class head")
    cfg = model.gpt.cfg
    max_length = cfg.context_length if max_length is None else max_length
    config = ClassifierConfig(cfg, list(label_names), model.pooling, max_length)
    ClassifierConfig.from_dict(config.to_dict())  # the same checks as loading
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).unlink(missing_ok=True)
    write_safetensors(run_dir / WEIGHTS_FILE, classifier_tensors(model), metadata={"format": FORMAT})
    with atomic_open(run_dir / CONFIG_FILE) as file:
        file.write((json.dumps(config.to_dict(), indent=2) + "\n").encode("utf-8"))


def load_classifier(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[GPTClassifier, ClassifierConfig]:
    """Rebuild a saved classifier in eval mode on `device`. Nothing is unpickled: the config
    is JSON and the weights are safetensors. ValueError (one line) when the folder is missing,
    incomplete, corrupt, or its weights do not match its config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist (train one with: python train.py --out {run_dir})")
    config_path, weights_path = run_dir / CONFIG_FILE, run_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{path} is missing: {run_dir} is not a complete saved classifier")
    try:
        config = ClassifierConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{config_path}: {' '.join(str(error).split())}") from error
    tensors = read_safetensors(weights_path)
    # Built on the meta device: no memory and no random init, since every weight comes from the file.
    with torch.device("meta"):
        model = GPTClassifier(GPTModel(config.gpt), config.num_classes, config.pooling)
    expected = {name: tensor for name, tensor in model.state_dict().items() if name != "gpt.lm_head.weight"}
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match {config_path}: missing tensors {missing[:3]}, "
            f"unexpected tensors {unexpected[:3]}"
        )
    for name, want in expected.items():
        if tensors[name].shape != want.shape:
            raise ValueError(
                f"tensor {name}: shape {tuple(tensors[name].shape)} in {weights_path}, "
                f"{config_path} expects {tuple(want.shape)}"
            )
    state = {name: tensors[name].to(want.dtype) for name, want in expected.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.gpt.lm_head.weight = model.gpt.wte.weight  # re-tie the (unused) vocabulary head
    return model.to(device).eval(), config


# --------------------------------------------------------------------------- 5. predict and the command line


@dataclass
class Prediction:
    text: str
    label: str
    probabilities: dict[str, float]


def prepare_tokens(tokenizer, text: str, max_length: int) -> list[int]:
    """The token ids the classifier reads for `text`.

    A text longer than max_length tokens keeps its first max_length tokens (as in training).
    An empty text becomes the single token <|endoftext|> (50256): the model's view of "no
    text", which still gets a label and probabilities, never an error.
    """
    token_ids = data.encode(tokenizer, text)[:max_length]
    return token_ids or [data.PAD_TOKEN_ID]


def predict(
    model: GPTClassifier,
    config: ClassifierConfig,
    texts: list[str],
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> list[Prediction]:
    """Label and class probabilities for each text, in the order given.

    Texts are tokenized (`prepare_tokens`: truncation and empty texts), sorted by length so
    each batch carries little padding, run in eval mode without autograd, and returned in
    their original order. `device` moves the model there; None keeps it where it is.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    tokenizer = data.get_tokenizer(config.tokenizer)
    token_ids = [prepare_tokens(tokenizer, text, config.max_length) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: len(token_ids[i]))
    probabilities: list[list[float]] = [[] for _ in texts]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = data.collate([(token_ids[i], 0) for i in chunk]).to(device)
                logits = model(batch.token_ids, batch.lengths)  # (B, K)
                for i, row in zip(chunk, torch.softmax(logits.float(), dim=-1).tolist()):
                    probabilities[i] = row
    finally:
        model.train(was_training)
    names = config.label_names
    return [
        Prediction(text, names[row.index(max(row))], dict(zip(names, row)))
        for text, row in zip(texts, probabilities)
    ]


def read_texts(source: str) -> list[str]:
    """One text per line of the file `source` ("-": standard input). Every line counts, blank
    lines included, so output i always answers input line i."""
    try:
        content = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {source}: {' '.join(str(error).split())}") from error
    lines = content.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.removesuffix("\r") for line in lines]


def shorten(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="classify.py",
        description="Classify texts with a fine-tuned GPT-2 classifier saved by train.py.",
        epilog=(
            "An empty text is classified as the single token <|endoftext|> (the model's view of 'no text'). "
            "A text longer than the run's max_length keeps its first max_length tokens, as in training. "
            "Messages per second are reported on stderr."
        ),
    )
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="folder written by train.py --out")
    parser.add_argument("--file", metavar="F", help="read one text per line from F ('-' for stdin)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {text, label, probabilities}")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (default 32)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    return parser.parse_args(argv)


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return device


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0, or 2 with one line on stderr)."""
    try:
        args = _parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already reported
        return int(exit_.code or 0)
    try:
        texts = list(args.texts) + (read_texts(args.file) if args.file else [])
        if not texts:
            raise ValueError("nothing to classify: give texts as arguments or --file F ('-' for stdin)")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be at least 1")
        device = _device(args.device)
        model, config = load_classifier(args.model, device)
        start = time.perf_counter()
        predictions = predict(model, config, texts, args.batch_size)
        seconds = time.perf_counter() - start
    except ValueError as error:
        print(f"classify.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(p) for p in predictions], ensure_ascii=False, indent=2))
    else:
        for p in predictions:
            probabilities = " ".join(f"{name}={value:.3f}" for name, value in p.probabilities.items())
            print(f"{p.label}\t{probabilities}\t{shorten(p.text)}")
    rate = len(texts) / max(seconds, 1e-9)
    print(f"{len(texts)} texts in {seconds:.2f} s: {rate:.1f} messages/s on {device}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
