"""GPT-2 in pure PyTorch: the pretrained model that chapter 06 turns into a classifier.

Step 3 of the chapter's pipeline ("GPT"): token ids in, one hidden vector per token out.
The file reads in the order data flows: configuration, attention, feed-forward, block,
model. Module names are the GPT-2 checkpoint's own (`wte`, `h.0.attn.c_attn`, `ln_f`, ...),
so loading pretrained weights is a rename table, not a wall of assignments. Then come the
pretrained weights: safetensors files, loading them (`load_gpt2`), downloading them from the
Hugging Face hub; and last `generate` with a small CLI, a sanity check of loaded weights:

    python gpt.py "Every effort moves"

The library depends on torch alone, so it can be copied into another project on its own
(the CLI also imports tiktoken).
"""

from __future__ import annotations

import warnings

# torch warns at import when NumPy is missing; this project does not use NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import argparse
import contextlib
import hashlib
import http.client
import json
import math
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model; the defaults are gpt2-small (124M parameters)."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0  # the chapter fine-tunes without dropout
    qkv_bias: bool = True  # GPT-2's query/key/value projection has a bias

    def __post_init__(self) -> None:
        sizes = {"vocab_size": self.vocab_size, "context_length": self.context_length,
                 "emb_dim": self.emb_dim, "n_heads": self.n_heads}
        wrong = {name: size for name, size in sizes.items() if not (isinstance(size, int) and size >= 1)}
        if wrong or not (isinstance(self.n_layers, int) and self.n_layers >= 0):
            raise ValueError(
                f"GPTConfig: sizes must be integers >= 1 (n_layers >= 0); got {wrong or {'n_layers': self.n_layers}}"
            )
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")


PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
}


# --------------------------------------------------------------------------- attention


def causal_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dropout: nn.Module
) -> torch.Tensor:
    """Scaled dot-product attention under a causal mask, written out step by step.

    queries, keys, values: (B, H, T, hs). This is the version a reader follows;
    `CausalSelfAttention` uses PyTorch's fused kernel instead, and a test proves them equal.
    """
    num_tokens, head_dim = queries.shape[-2], queries.shape[-1]
    attn_scores = queries @ keys.transpose(-2, -1)  # (B, H, T, T)
    attn_scores = attn_scores / math.sqrt(head_dim)  # keeps softmax out of its flat tails
    # Causal mask: position t may only look at positions <= t, never at the future.
    future = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=queries.device).triu(1)
    attn_scores = attn_scores.masked_fill(future, float("-inf"))  # (B, H, T, T)
    attn_weights = torch.softmax(attn_scores, dim=-1)  # (B, H, T, T), rows sum to 1
    attn_weights = dropout(attn_weights)
    return attn_weights @ values  # (B, H, T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: each token mixes in what came before it."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.drop_rate = cfg.drop_rate
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_dropout = nn.Dropout(cfg.drop_rate)
        self.resid_dropout = nn.Dropout(cfg.drop_rate)
        self.use_sdpa = True  # False selects the explicit `causal_attention`

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, _ = x.shape
        x = x.view(batch, num_tokens, self.n_heads, self.head_dim)  # (B, T, H, hs)
        return x.transpose(1, 2)  # (B, H, T, hs)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, num_tokens, _ = x.shape
        return x.transpose(1, 2).reshape(batch, num_tokens, self.n_heads * self.head_dim)  # (B, T, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries, keys, values = self.c_attn(x).chunk(3, dim=-1)  # 3 x (B, T, C)
        queries, keys, values = map(self.split_heads, (queries, keys, values))  # (B, H, T, hs)
        if self.use_sdpa:
            dropout_p = self.drop_rate if self.training else 0.0
            context = F.scaled_dot_product_attention(
                queries, keys, values, dropout_p=dropout_p, is_causal=True
            )  # (B, H, T, hs)
        else:
            context = causal_attention(queries, keys, values, self.attn_dropout)  # (B, H, T, hs)
        return self.resid_dropout(self.c_proj(self.merge_heads(context)))  # (B, T, C)


# --------------------------------------------------------------------------- feed-forward and block


class FeedForward(nn.Module):
    """Position-wise MLP: widen 4x, GELU (GPT-2's tanh approximation), project back."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Transformer block: pre-LayerNorm attention and feed-forward, each inside a residual."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


# --------------------------------------------------------------------------- the model


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, a stack of blocks, a final LayerNorm, and an
    output head tied to the token embedding.

    `model(token_ids)` with token_ids (B, T) returns next-token logits (B, T, V);
    `model.hidden_states(token_ids)` returns the final hidden states (B, T, C), which is
    what the classifier reads instead of the vocabulary logits.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # GPT-2 ties the output head to the embedding
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * layers).
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embedding plus position embedding: the input of the first block."""
        num_tokens = token_ids.shape[1]
        if num_tokens > self.cfg.context_length:
            raise ValueError(
                f"{num_tokens} tokens exceed the model's context length {self.cfg.context_length}"
            )
        positions = torch.arange(num_tokens, device=token_ids.device)  # (T,)
        return self.drop(self.wte(token_ids) + self.wpe(positions))  # (B, T, C)

    def hidden_states(self, token_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(token_ids)  # (B, T, C)
        for block in self.h:
            x = block(x)  # (B, T, C)
        return self.ln_f(x)  # (B, T, C)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(token_ids))  # (B, T, V)

    def set_fast_attention(self, enabled: bool) -> None:
        """Choose between the fused SDPA kernel (True) and the explicit math (False)."""
        for block in self.h:
            block.attn.use_sdpa = enabled


# --------------------------------------------------------------------------- safetensors files
#
# A .safetensors file is: 8 bytes (little-endian header length N), N bytes of JSON
# {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {..}},
# then the raw little-endian bytes of every tensor, back to back. Reading it takes a few
# lines; most of what follows checks that a damaged file can never become a wrong tensor.

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the official library's limit


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: where a tensor's bytes lie in the data region that follows the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads hook: a name given twice would silently keep only its last entry."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _tensor_info(where: str, entry: object, data_size: int) -> TensorInfo:
    """Validate one header entry; `where` is "<file>: tensor <name>" for the error messages."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ValueError(f"{where}: entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(size) and size >= 0 for size in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise ValueError(f"{where}: data_offsets {offsets} fall outside the {data_size}-byte data region")
    needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != needed:
        raise ValueError(
            f"{where}: data_offsets {offsets} hold {end - begin} bytes, "
            f"but shape {shape} of {dtype} needs {needed}"
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def _read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header: (tensor infos, metadata, offset of the data)."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            header_size = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or header_size > file_size - 8:
                raise ValueError(
                    f"{path}: truncated or not a safetensors file ({file_size} bytes, "
                    f"header length {header_size if len(prefix) == 8 else '?'})"
                )
            if header_size > MAX_HEADER_BYTES:
                raise ValueError(f"{path}: header of {header_size} bytes is larger than {MAX_HEADER_BYTES}")
            raw_header = file.read(header_size)
    except OSError as error:
        raise ValueError(f"{path}: cannot read the file ({error.strerror or error})") from None
    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as error:  # JSON and UTF-8 errors are ValueErrors
        raise ValueError(f"{path}: header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    data_size = file_size - 8 - header_size
    infos = {
        name: _tensor_info(f"{path}: tensor {name!r}", entry, data_size) for name, entry in header.items()
    }

    # The tensors must tile the data region exactly: no overlap, no gap, nothing left over.
    position, previous = 0, None
    for name, info in sorted(infos.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin < position:
            raise ValueError(f"{path}: tensor {name!r} overlaps tensor {previous!r}")
        if info.begin > position:
            raise ValueError(
                f"{path}: tensor {name!r} starts at byte {info.begin}, leaving a gap at {position}"
            )
        position, previous = info.end, name
    if position != data_size:
        raise ValueError(f"{path}: the tensors cover {position} bytes of a {data_size}-byte data region")
    return infos, metadata, 8 + header_size


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for each tensor of a .safetensors file, bytes straight from disk
    into the tensor. The whole header is checked before the first tensor is read."""
    infos, _, data_start = _read_header(path)
    try:
        with open(path, "rb") as file:
            for name, info in infos.items():
                dtype = SAFETENSORS_DTYPES[info.dtype]
                if info.begin == info.end:  # empty tensor: nothing to read
                    yield name, torch.empty(info.shape, dtype=dtype)
                    continue
                buffer = bytearray(info.end - info.begin)
                file.seek(data_start + info.begin)
                if file.readinto(buffer) != len(buffer):
                    raise ValueError(
                        f"{path}: tensor {name!r}: the file ended early (changed while reading?)"
                    )
                yield name, torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)  # shares buffer
    except OSError as error:
        raise ValueError(f"{path}: cannot read the file ({error.strerror or error})") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file. Peak memory is one copy of the tensors, and any
    damage to the file raises ValueError naming the file and the tensor."""
    return dict(iter_safetensors(path))


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The file's `__metadata__` block (an empty dict when it has none)."""
    return _read_header(path)[1]


def _tensor_bytes(tensor: torch.Tensor) -> bytearray:
    """The tensor's elements as contiguous little-endian bytes (the machine's order on every
    platform PyTorch supports)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)  # (numel,): 0-d becomes (1,)
    buffer = bytearray(flat.numel() * flat.element_size())
    if buffer:
        torch.frombuffer(buffer, dtype=torch.uint8).copy_(flat.view(torch.uint8))
    return buffer


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors (and optional string metadata) as a .safetensors file, atomically.

    Tensors that share storage, like GPT-2's tied embedding and output head, are each
    written in full, as the format has no notion of sharing. The file appears under its
    name only once completely written: a crash leaves either the old file or none.
    """
    path = Path(path)
    header: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"{path}: metadata must map strings to strings, got {metadata!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"{path}: invalid tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in DTYPE_NAMES:
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"{path}: tensor {name!r}: cannot store {kind} (supported: {', '.join(SAFETENSORS_DTYPES)})"
            )
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the data starts 8-byte aligned

    with atomic_open(path) as file:
        file.write(len(header_bytes).to_bytes(8, "little"))
        file.write(header_bytes)
        for tensor in tensors.values():
            file.write(_tensor_bytes(tensor))


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A new binary file that appears at `path` only once completely written: it is written
    to a temporary file in the same folder, flushed to disk, then renamed over `path`, so a
    crash or Ctrl-C leaves either the old file or none, never half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # same folder: rename is atomic
    try:
        with open(temporary, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- loading GPT-2 weights
#
# Our module names are the checkpoint's, so loading is a rename table: strip the `transformer.`
# prefix save_pretrained adds, skip the causal-mask buffers, and transpose GPT-2's Conv1D weights,
# which it stores as (in, out) where nn.Linear keeps (out, in).

HF_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers, not weights
HF_CONV1D_WEIGHTS = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
LOADABLE_DTYPES = {"F32", "F16", "BF16"}
HF_HEAD_DIM = 64  # every GPT-2 size uses 64-wide attention heads


def gpt2_name(hf_name: str) -> str | None:
    """GPTModel's name for a Hugging Face GPT-2 tensor; None for a buffer to skip.

    Both key styles work: the hub's (`wte.weight`, `h.0.attn.c_attn.weight`, ...) and
    save_pretrained's (`transformer.wte.weight`, ..., maybe `lm_head.weight`).
    """
    name = hf_name.removeprefix("transformer.")
    return None if HF_IGNORED.fullmatch(name) else name


def expected_file_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 file must hold for `cfg`, with the shape it has in the file."""
    with torch.device("meta"):  # shapes only: no memory, no initialization
        model = GPTModel(cfg)
    shapes = {}
    for name, param in model.named_parameters():  # lm_head.weight is wte.weight: listed once
        shape = tuple(param.shape)
        shapes[name] = shape[::-1] if HF_CONV1D_WEIGHTS.fullmatch(name) else shape
    return shapes


def check_checkpoint(entries: dict[str, TensorInfo], cfg: GPTConfig, source: object) -> None:
    """Strict, before any weight is read: every tensor present, none unknown, each shape
    right, a float dtype. `entries` maps GPTModel names to the file's header entries."""
    expected = expected_file_shapes(cfg)
    expected["lm_head.weight"] = expected["wte.weight"]  # optional: tied to wte when present
    for name, want in expected.items():
        if name not in entries and name != "lm_head.weight":
            raise ValueError(f"{source}: tensor {name} (shape {want}) is missing from the file")
    for name, info in entries.items():
        if name not in expected:
            raise ValueError(
                f"{source}: unknown tensor {name} (shape {info.shape}): GPTModel has no such weight"
            )
        if info.shape != expected[name]:
            raise ValueError(
                f"{source}: tensor {name}: shape {info.shape} in file, model expects {expected[name]}"
            )
        if info.dtype not in LOADABLE_DTYPES:
            raise ValueError(
                f"{source}: tensor {name} is {info.dtype}; GPT-2 weights load from {sorted(LOADABLE_DTYPES)}"
            )


def as_parameter(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor as GPTModel holds it: float32, Conv1D weights transposed."""
    tensor = tensor.float()  # F16/BF16 files load into float32; F32 is not copied
    if HF_CONV1D_WEIGHTS.fullmatch(name):
        tensor = tensor.t().contiguous()  # Conv1D (in, out) -> nn.Linear (out, in)
    return tensor


def load_checkpoint(path: Path, cfg: GPTConfig) -> GPTModel:
    """A float32 GPTModel whose parameters are exactly the tensors of a GPT-2 .safetensors file.

    Tensors are read one at a time and become the parameters of a model made on the meta
    device, so loading holds one copy of the weights, not two.
    """
    infos, _, _ = _read_header(path)
    check_checkpoint({gpt2_name(n): info for n, info in infos.items() if gpt2_name(n)}, cfg, path)
    state, lm_head = {}, None
    for hf_name, tensor in iter_safetensors(path):
        name = gpt2_name(hf_name)
        if name == "lm_head.weight":
            lm_head = tensor
        elif name is not None:
            state[name] = as_parameter(name, tensor)
    if lm_head is not None and not torch.equal(lm_head.float(), state["wte.weight"]):
        raise ValueError(
            f"{path}: lm_head.weight differs from wte.weight, but GPTModel ties its output head "
            "to the token embedding (as GPT-2 does); this checkpoint cannot load into it"
        )
    with torch.device("meta"):
        model = GPTModel(cfg)
    model.load_state_dict(state, strict=False, assign=True)  # check_checkpoint was the strict check
    model.lm_head.weight = model.wte.weight  # assign replaced wte's Parameter: tie the head again
    return model.eval()


def config_from_shapes(
    shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], source: object
) -> GPTConfig:
    """Infer a GPT-2 config from a checkpoint's tensor shapes.

    Sizes are in the shapes; the head count is not, so it comes from the metadata
    (`n_head`, Hugging Face's name, or `n_heads`) or else from GPT-2's 64-wide heads.
    """
    shapes = {name.removeprefix("transformer."): shape for name, shape in shapes.items()}
    if len(shapes.get("wte.weight", ())) != 2 or len(shapes.get("wpe.weight", ())) != 2:
        raise ValueError(f"{source}: no 2-d wte.weight and wpe.weight: not a GPT-2 checkpoint")
    vocab_size, emb_dim = shapes["wte.weight"]
    layers = {int(match.group(1)) for name in shapes if (match := re.match(r"h\.(\d+)\.", name))}
    heads = metadata.get("n_head", metadata.get("n_heads"))
    if heads is None and emb_dim % HF_HEAD_DIM:
        raise ValueError(
            f"{source}: cannot infer the number of heads of a {emb_dim}-wide model; "
            "pass config=GPTConfig(...) or add n_head to the file's metadata"
        )
    try:
        n_heads = int(heads) if heads is not None else emb_dim // HF_HEAD_DIM
        return GPTConfig(
            vocab_size=vocab_size,
            context_length=shapes["wpe.weight"][0],
            emb_dim=emb_dim,
            n_layers=len(layers),
            n_heads=n_heads,
            qkv_bias="h.0.attn.c_attn.bias" in shapes or not layers,
        )
    except ValueError as error:
        raise ValueError(f"{source}: inconsistent GPT-2 shapes or metadata ({error})") from None


def config_from_hf_json(path: Path) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json."""
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: a config.json must hold a JSON object")
    sizes = {
        "vocab_size": hf.get("vocab_size"),
        "context_length": hf.get("n_positions", hf.get("n_ctx")),  # older configs say n_ctx
        "emb_dim": hf.get("n_embd"),
        "n_layers": hf.get("n_layer"),
        "n_heads": hf.get("n_head"),
    }
    wrong = {name: value for name, value in sizes.items() if not (_is_int(value) and value > 0)}
    if wrong:
        raise ValueError(
            f"{path}: vocab_size, n_positions, n_embd, n_layer and n_head must be positive integers; "
            f"got {wrong} (in GPTConfig's names)"
        )
    try:
        cfg = GPTConfig(**sizes)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    # Variants GPTModel does not implement must not load silently into the wrong architecture.
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * cfg.emb_dim)),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(
                f"{path}: {key}={value!r} is not GPT-2's ({allowed[0]!r}); GPTModel cannot load it"
            )
    return cfg


def _unknown_source(source: object) -> ValueError:
    return ValueError(
        f"{source!r} is neither a preset ({', '.join(PRESETS)}), a Hugging Face model directory "
        "(config.json + model.safetensors) nor a .safetensors file"
    )


def load_config(source: str | Path) -> GPTConfig:
    """The config of a preset name, a Hugging Face directory, or a .safetensors file (header only)."""
    if isinstance(source, str) and source in PRESETS:
        return PRESETS[source]
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: {_unknown_source(source)}")
        return config_from_hf_json(path / "config.json")
    if path.is_file() and path.suffix == ".safetensors":
        infos, metadata, _ = _read_header(path)
        return config_from_shapes({name: info.shape for name, info in infos.items()}, metadata, path)
    raise _unknown_source(source)


def load_gpt2(
    source: str | Path,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    *,
    config: GPTConfig | None = None,
) -> GPTModel:
    """Pretrained GPT-2 in eval mode, from a preset name (downloaded once into the cache),
    a Hugging Face directory (config.json + model.safetensors), or a .safetensors file.

    `config` overrides the architecture read or inferred from the source (a file's shapes
    give every size but the head count). F32, F16 and BF16 files load into float32.
    """
    cfg = config if config is not None else load_config(source)
    if isinstance(source, str) and source in PRESETS:
        path = download_preset(source, cache_dir, progress)
    elif Path(source).is_dir():
        path = Path(source) / "model.safetensors"
        if not path.is_file():
            raise ValueError(f"{source} has no model.safetensors (save with safe_serialization=True)")
    elif Path(source).is_file() and Path(source).suffix == ".safetensors":
        path = Path(source)
    else:
        raise _unknown_source(source)
    return load_checkpoint(path, cfg)


# --------------------------------------------------------------------------- downloading the weights
#
# The presets come from the Hugging Face hub. A download streams into `<dest>.part`, resumes
# it with an HTTP Range request after an interruption, checks the sha256 the hub publishes,
# and only then renames it into place: a file under its final name is always complete.

HF_HUB_URL = "https://huggingface.co"  # the environment variable GPT2_HUB_URL overrides it
PRESET_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
USER_AGENT = "gpt2-classification/0.1 (urllib)"
CHUNK_BYTES = 1 << 20
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)

Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None when unknown)


def default_cache_dir() -> Path:
    """Where downloads are kept: $GPT2_CLASSIFICATION_CACHE, else $XDG_CACHE_HOME or ~/.cache,
    then gpt2-classification."""
    if os.environ.get("GPT2_CLASSIFICATION_CACHE"):
        return Path(os.environ["GPT2_CLASSIFICATION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-classification"


def print_progress(done: int, total: int | None) -> None:
    """A progress callback for CLIs: one line on stderr, rewritten in place."""
    if total:
        line = f"\rdownloading: {done / 1e6:9.1f} of {total / 1e6:.1f} MB ({100 * done / total:3.0f}%)"
    else:
        line = f"\rdownloading: {done / 1e6:9.1f} MB"
    sys.stderr.write(line + ("\n" if total and done >= total else ""))
    sys.stderr.flush()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def _fetch(url: str, partial: Path, progress: Progress | None, timeout: float) -> str | None:
    """Append the rest of `url` to `partial` (all of it when the server ignores Range).

    Returns the sha256 of the whole partial file, or None when the server says (HTTP 416)
    that `partial` already holds every byte, or more: the caller must then check it.
    """
    hasher, done = hashlib.sha256(), 0
    if partial.exists():  # resuming: hash the bytes we already have
        with open(partial, "rb") as file:
            while chunk := file.read(CHUNK_BYTES):
                hasher.update(chunk)
                done += len(chunk)
    headers = {"User-Agent": USER_AGENT}
    if done:
        headers["Range"] = f"bytes={done}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and done:  # "range not satisfiable": nothing left after byte `done`
            return None
        raise
    with response:
        if done and response.status != 206:  # the server ignored Range and sends it all: restart
            hasher, done = hashlib.sha256(), 0
        elif done and not response.headers.get("Content-Range", "").startswith(f"bytes {done}-"):
            raise ConnectionError(
                f"asked for bytes {done}- but got {response.headers.get('Content-Range')!r}"
            )
        length = response.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        with open(partial, "ab" if done else "wb") as file:
            if progress:
                progress(done, total)
            while chunk := response.read(CHUNK_BYTES):
                file.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    if total is not None and done < total:
        raise ConnectionError(f"the connection closed after {done} of {total} bytes")
    return hasher.hexdigest()


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    progress: Progress | None = None,
    *,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest`, resumably and atomically; returns `dest`.

    Returns at once, with no request, when `dest` exists. Bytes go to `<dest>.part` first; an
    interrupted download resumes from there on the next call. With `sha256`, a mismatch
    deletes the partial file and raises ValueError, leaving nothing at `dest`. Network
    failures raise ConnectionError naming the URL and the reason.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        digest = _fetch(url, partial, progress, timeout)
        if digest is None:  # the partial file already held everything the server has
            if sha256 is None:  # nothing to check it against: fetch it again from scratch
                partial.unlink()
                digest = _fetch(url, partial, progress, timeout)
            else:
                digest = file_sha256(partial)
    except urllib.error.HTTPError as error:
        raise ConnectionError(f"could not download {url}: HTTP {error.code} {error.reason}") from None
    except NETWORK_ERRORS as error:
        kept = (
            f"; the {partial.stat().st_size} bytes so far stay in {partial} for the next try"
            if partial.exists()
            else ""
        )
        raise ConnectionError(
            f"could not download {url}: {getattr(error, 'reason', None) or error!r}{kept}"
        ) from None
    if sha256 is not None and digest != sha256.lower():
        partial.unlink()
        raise ValueError(
            f"{url}: the download's sha256 is {digest}, expected {sha256.lower()}; "
            "the corrupt file was deleted, run again to download it afresh"
        )
    os.replace(partial, dest)
    return dest


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs) -> None:
        return None  # hand back the 3xx answer itself: its headers are what we came for


def hub_sha256(url: str, timeout: float = 60.0) -> str:
    """The sha256 the Hugging Face hub publishes for a file stored with Git LFS.

    The hub answers a HEAD request for a resolve URL with a redirect to its CDN that carries
    `X-Linked-Etag: "<sha256>"` (and `X-Linked-Size`); the redirect is not followed, except
    when it stays on the hub (a renamed repository).
    """
    opener = urllib.request.build_opener(_NoRedirect)
    for _ in range(5):
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
        try:
            with opener.open(request, timeout=timeout) as response:
                status, headers = response.status, response.headers
        except urllib.error.HTTPError as error:  # a 3xx lands here with _NoRedirect
            if not 300 <= error.code < 400:
                raise ConnectionError(f"could not reach {url}: HTTP {error.code} {error.reason}") from None
            status, headers = error.code, error.headers
        except NETWORK_ERRORS as error:
            raise ConnectionError(
                f"could not reach {url}: {getattr(error, 'reason', None) or error!r}"
            ) from None
        etag = headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            return etag
        location = headers.get("Location", "")
        if not (300 <= status < 400 and location.startswith("/")):
            break
        url = urllib.parse.urljoin(url, location)  # a redirect within the hub: ask there
    raise ValueError(
        f"{url}: the hub published no sha256 (X-Linked-Etag header) for this file, "
        "so it cannot be verified; refusing to download it"
    )


def preset_url(name: str) -> str:
    hub = os.environ.get("GPT2_HUB_URL") or HF_HUB_URL
    return f"{hub.rstrip('/')}/{PRESET_REPOS[name]}/resolve/main/model.safetensors"


def download_preset(name: str, cache_dir: str | Path | None = None, progress: Progress | None = None) -> Path:
    """The preset's model.safetensors in `<cache>/<preset>/`, downloaded and verified once;
    later calls make no request at all."""
    if name not in PRESET_REPOS:
        raise _unknown_source(name)
    dest = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name / "model.safetensors"
    if dest.is_file():
        return dest
    url = preset_url(name)
    return download(url, dest, sha256=hub_sha256(url), progress=progress)


# --------------------------------------------------------------------------- generation and the CLI


@torch.no_grad()
def generate(
    model: GPTModel,
    token_ids: torch.Tensor,
    max_new_tokens: int,
    top_k: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend token_ids (B, T) by max_new_tokens tokens: (B, T + max_new_tokens).

    Greedy (the most likely next token) when top_k is None or temperature is 0; otherwise
    samples among the top_k most likely tokens, their logits divided by temperature.
    Call model.eval() first if the model has dropout.
    """
    if max_new_tokens < 0 or (top_k is not None and top_k < 1) or temperature < 0:
        raise ValueError(
            f"need max_new_tokens >= 0, top_k >= 1, temperature >= 0; got {max_new_tokens}, {top_k}, {temperature}"
        )
    for _ in range(max_new_tokens):
        context = token_ids[:, -model.cfg.context_length :]  # (B, <= context_length)
        logits = model(context)[:, -1, :]  # (B, V): only the last position predicts the next token
        if top_k is None or temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            top_logits, top_ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # (B, k)
            probabilities = torch.softmax(top_logits / temperature, dim=-1)  # (B, k)
            choice = torch.multinomial(probabilities, num_samples=1, generator=generator)  # (B, 1)
            next_token = top_ids.gather(-1, choice)  # (B, 1)
        token_ids = torch.cat([token_ids, next_token], dim=1)  # (B, T + 1)
    return token_ids


def main(argv: list[str] | None = None) -> int:
    """`python gpt.py "Every effort moves"`: load GPT-2 and print a continuation."""
    parser = argparse.ArgumentParser(
        description="Continue a text with pretrained GPT-2 (a check that the weights loaded right).",
        epilog="With the real gpt2-small weights, greedy decoding of 'Every effort moves' "
        "starts 'Every effort moves forward, but it's not enough.'",
    )
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument(
        "--model",
        default="gpt2-small",
        help=f"preset ({', '.join(PRESETS)}), Hugging Face directory or .safetensors file (default: gpt2-small)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens to add (default: 20)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="sample among the k most likely tokens (default: greedy)"
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature with --top-k (default: 1.0)"
    )
    parser.add_argument("--seed", type=int, default=123, help="random seed for sampling (default: 123)")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help=f"download folder (default: {default_cache_dir()})"
    )
    args = parser.parse_args(argv)

    try:
        cfg = load_config(args.model)  # a bad --model fails here, before any download
        import tiktoken  # the CLI's dependency only: the library above needs torch alone

        try:
            tokenizer = tiktoken.get_encoding("gpt2")
        except Exception as error:  # offline with no cached BPE files; tiktoken raises its download's error
            raise ValueError(
                f"cannot load the GPT-2 tokenizer ({type(error).__name__}); "
                "offline, set TIKTOKEN_CACHE_DIR to a folder holding its files"
            ) from None
        prompt_ids = tokenizer.encode(args.prompt, allowed_special={"<|endoftext|>"})
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if cfg.vocab_size < tokenizer.n_vocab:
            raise ValueError(
                f"--model {args.model} has {cfg.vocab_size} tokens, fewer than GPT-2's tokenizer"
            )
        model = load_gpt2(args.model, cache_dir=args.cache_dir, progress=print_progress)
        output = generate(
            model,
            torch.tensor([prompt_ids]),  # (1, T)
            args.max_new_tokens,
            top_k=args.top_k,
            temperature=args.temperature,
            generator=torch.Generator().manual_seed(args.seed),
        )
    except (ValueError, OSError) as error:  # OSError covers ConnectionError and unwritable caches
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(tokenizer.decode(output[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
