"""GPT-2 in pure PyTorch: the pretrained model that chapter 06 turns into a classifier.

Step 3 of the chapter's pipeline ("GPT"): token ids in, one hidden vector per token out. The file
reads in the order data flows: configuration, attention, feed-forward, block, model; then mapping
pretrained weights onto it (`load_gpt2`: module names are the checkpoint's own, `wte`,
`h.0.attn.c_attn`, `ln_f`..., so that is a rename table) and reading the .safetensors files they
come in. The checks that keep an untrusted file from becoming a crash or a wrong model close the
file. Copied alone into another project it needs torch only; `python gpt.py "Every effort moves"`
also needs hub.py, which downloads, tokenizes and generates.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

if __name__ == "__main__":  # torch warns at import when NumPy is missing; this project does not use NumPy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model; the defaults are gpt2-small (124M parameters). GPT-2's four sizes
    are PRESETS, at the end of the file: building them runs the checks that precede them."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0  # the book fine-tunes without dropout
    qkv_bias: bool = True  # GPT-2's query/key/value projection has a bias

    def __post_init__(self) -> None:
        check_config(self)  # a config.json may hold anything: the checks are at the end of the file


def causal_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dropout: nn.Module,
                     visible: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention under a causal mask, step by step: queries, keys, values (B, H,
    T, hs). The version a reader follows; `CausalSelfAttention` calls PyTorch's fused kernel by
    default, and a test proves them equal. `visible`: the keys each query may see, when the
    queries are not positions 0..T-1 (a classifier's one query per text)."""
    num_tokens, head_dim = queries.shape[-2], queries.shape[-1]
    attn_scores = queries @ keys.transpose(-2, -1)  # (B, H, T, T)
    attn_scores = attn_scores / math.sqrt(head_dim)  # keeps softmax out of its flat tails
    if visible is None:  # causal mask: position t may only look at positions <= t, never at the future
        visible = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=queries.device).tril()
    attn_scores = attn_scores.masked_fill(~visible, float("-inf"))  # (B, H, T, T)
    attn_weights = dropout(torch.softmax(attn_scores, dim=-1))  # (B, H, T, T), rows sum to 1
    return attn_weights @ values  # (B, H, T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: each token mixes in what came before it."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.emb_dim // cfg.n_heads
        self.drop_rate = cfg.drop_rate
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_dropout = nn.Dropout(cfg.drop_rate)
        self.resid_dropout = nn.Dropout(cfg.drop_rate)
        self.use_sdpa = True  # False selects the explicit `causal_attention`

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, _ = x.shape
        return x.view(batch, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, emb_dim = x.shape
        queries, keys, values = map(self.split_heads, self.c_attn(x).chunk(3, dim=-1))  # (B, H, T, hs)
        if self.use_sdpa:
            dropout_p = self.drop_rate if self.training else 0.0
            context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True)
        else:
            context = causal_attention(queries, keys, values, self.attn_dropout)  # (B, H, T, hs)
        context = context.transpose(1, 2).reshape(batch, num_tokens, emb_dim)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(context))  # (B, T, C)


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


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, a stack of blocks, a final LayerNorm, and an output head
    tied to the token embedding. `model(token_ids (B, T))` gives next-token logits (B, T, V);
    `model.hidden_states(token_ids)` the final hidden states (B, T, C), which the classifier reads
    instead of the vocabulary logits (chapter section "Extraindo representações do modelo").
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
            raise ValueError(f"{num_tokens} tokens exceed the model's context length {self.cfg.context_length}")
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


# --------------------------------------------------------------------------- mapping pretrained weights
#
# Our module names are the checkpoint's, so loading is a rename table: strip the `transformer.`
# prefix save_pretrained adds, skip the causal-mask buffers and a classifier's head, and transpose
# GPT-2's Conv1D weights, which it stores as (in, out) where nn.Linear keeps (out, in).

HF_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)|score\.weight")  # mask buffers; a classifier's head
HF_CONV1D_WEIGHTS = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
HF_HEAD_DIM = 64  # every GPT-2 size uses 64-wide attention heads
LOADABLE_DTYPES = {"F32", "F16", "BF16"}


def gpt2_name(hf_name: str) -> str | None:
    """GPTModel's name for a Hugging Face GPT-2 tensor (hub or save_pretrained style); None: skip it."""
    return None if HF_IGNORED.fullmatch(name := hf_name.removeprefix("transformer.")) else name


def load_gpt2(source: str | Path, *, config: GPTConfig | None = None) -> GPTModel:
    """Pretrained GPT-2 in eval mode from a Hugging Face folder (config.json + model.safetensors or
    its shards) or a .safetensors file, strictly: every tensor present, none unknown, each shape
    right, every number finite. `config` overrides the architecture read or inferred from the source.
    Each tensor becomes a parameter (float32) of a model built on the meta device: one copy of the
    weights in memory, not two. A preset's weights: `gpt.load_gpt2(hub.fetch("gpt2-small"))`."""
    cfg = config if config is not None else load_config(source)
    located = read_headers(_local(source))  # name -> (file, TensorInfo)
    blocks = {match.group(1) for name in located if (match := re.match(r"(?:transformer\.)?h\.(\d+)\.", name))}
    if cfg.n_layers > len(blocks):  # checked before building anything: a config may claim a billion blocks
        raise ValueError(f"{source}: the config says {cfg.n_layers} blocks, the file holds {len(blocks)}")
    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        model = GPTModel(cfg)
    expected = {name: tuple(param.shape)[:: -1 if HF_CONV1D_WEIGHTS.fullmatch(name) else 1]
                for name, param in model.named_parameters()}  # as the file stores them
    found = {gpt2_name(name): (file, info) for name, (file, info) in located.items() if gpt2_name(name)}
    if len(found) < sum(gpt2_name(name) is not None for name in located):
        raise ValueError(f"{source}: a tensor is there both with and without the 'transformer.' prefix")
    if missing := [name for name in expected if name not in found]:
        raise ValueError(f"{source}: tensor {missing[0]} (shape {expected[missing[0]]}) is missing from the file")
    for name, (file, info) in found.items():
        want = expected.get(name, expected["wte.weight"] if name == "lm_head.weight" else None)
        if want is None:
            raise ValueError(f"{file}: unknown tensor {quoted(name)} (shape {info.shape}): GPTModel has no such weight")
        if info.shape != want:
            raise ValueError(f"{file}: tensor {name}: shape {info.shape} in file, model expects {want}")
        if info.dtype not in LOADABLE_DTYPES:
            raise ValueError(f"{file}: tensor {name} is {info.dtype}; weights load from {sorted(LOADABLE_DTYPES)}")
    state = {}
    for file in dict.fromkeys(file for file, _ in located.values()):  # each file (or shard) once
        for hf_name, tensor in read_safetensors(file).items():
            if (name := gpt2_name(hf_name)) is not None:
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"{file}: tensor {hf_name} holds NaN or infinity")
                tensor = tensor.float()  # F16/BF16 files load into float32; F32 is not copied
                state[name] = tensor.t().contiguous() if HF_CONV1D_WEIGHTS.fullmatch(name) else tensor
    if "lm_head.weight" in state and not torch.equal(state.pop("lm_head.weight"), state["wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight, but GPTModel ties its output head "
                         "to the token embedding (as GPT-2 does); this checkpoint cannot load into it")
    model.load_state_dict(state, strict=False, assign=True)  # the checks above were the strict ones
    model.lm_head.weight = model.wte.weight  # assign replaced wte's Parameter: tie the head again
    return model.eval()


def read_headers(path: Path) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor of a checkpoint, header checked: name -> (its file, where in it). A .safetensors
    file, a folder's model.safetensors, or the shards its model.safetensors.index.json lists."""
    if not path.is_dir():
        return {name: (path, info) for name, info in read_header(path)[0].items()}
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if os.path.lexists(single):  # lexists: a pipe or a dangling link there is an error, not a reason to look on
        return {name: (single, info) for name, info in read_header(single)[0].items()}
    if not os.path.lexists(index):
        raise ValueError(f"{path} has no model.safetensors (nor {index.name}): save it with safe_serialization=True")
    weight_map = check_weight_map(read_json(index), index)  # tensor name -> shard file beside the index
    located = {}
    for shard in sorted(set(weight_map.values())):
        for name, info in read_header(path / shard)[0].items():
            if weight_map.get(name) != shard:  # so no tensor comes from two shards
                raise ValueError(f"{path / shard}: tensor {quoted(name)} is not listed for this shard in {index.name}")
            located[name] = (path / shard, info)
    if missing := sorted(weight_map.keys() - located.keys()):
        raise ValueError(f"{index}: tensor {quoted(missing[0])} is not in {weight_map[missing[0]]}")
    return located


def _local(source: str | Path) -> Path:
    """`source` as a local Hugging Face folder or .safetensors file."""
    if isinstance(source, str) and source in PRESETS:
        raise ValueError(f"{source} is a preset: download its weights with hub.py, "
                         f"gpt.load_gpt2(hub.fetch({source!r})), or pass a local folder or .safetensors file")
    if (path := Path(source)).is_dir() or (path.exists() and path.suffix == ".safetensors"):
        return path
    raise ValueError(f"{source!r} is neither a preset ({', '.join(PRESETS)}), a Hugging Face model directory "
                     "(config.json + model.safetensors) nor a .safetensors file")


def load_config(source: str | Path) -> GPTConfig:
    """The architecture of a preset name, a Hugging Face folder (its config.json), or a
    .safetensors file (inferred from the tensor shapes in its header)."""
    if isinstance(source, str) and source in PRESETS:
        return PRESETS[source]
    if not (path := _local(source)).is_dir():
        return config_from_shapes({name: info.shape for name, info in read_header(path)[0].items()}, path)
    if not os.path.lexists(path / "config.json"):
        raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
    return config_from_hf(read_json(path / "config.json"), path / "config.json")


def config_from_shapes(shapes: dict[str, tuple[int, ...]], source: object) -> GPTConfig:
    """Sizes from the tensor shapes; the head count, which no shape holds, from GPT-2's 64-wide heads."""
    shapes = {name.removeprefix("transformer."): shape for name, shape in shapes.items()}
    if len(shapes.get("wte.weight", ())) != 2 or len(shapes.get("wpe.weight", ())) != 2:
        raise ValueError(f"{source}: no 2-d wte.weight and wpe.weight: not a GPT-2 checkpoint")
    (vocab_size, emb_dim), context_length = shapes["wte.weight"], shapes["wpe.weight"][0]
    layers = {match.group(1) for name in shapes if (match := re.match(r"h\.(\d+)\.", name))}
    if emb_dim % HF_HEAD_DIM:
        raise ValueError(f"{source}: a {emb_dim}-wide model has no 64-wide heads, so the file alone does not say "
                         "how many; put it in a folder with its config.json, or pass config=GPTConfig(...)")
    return GPTConfig(vocab_size, context_length, emb_dim, len(layers), emb_dim // HF_HEAD_DIM,
                     qkv_bias="h.0.attn.c_attn.bias" in shapes or not layers)


def config_from_hf(hf: object, where: Path) -> GPTConfig:
    """GPTConfig from what a Hugging Face config.json (at `where`) holds; variants GPTModel does not
    implement are refused, and so is a classifier saved by train.py, which is no GPT-2 folder."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: a config.json must hold a JSON object")
    if hf.get("format") == "gpt2-classifier":  # classify.ClassifierConfig's config.json
        raise ValueError(f"{where.parent} is a classifier saved by train.py: classify with python classify.py --model "
                         f"{where.parent}; to fine-tune it further, export it (python classify.py --model "
                         f"{where.parent} --export-hf HF_DIR) and train from that: python train.py --model HF_DIR")
    sizes = {"vocab_size": hf.get("vocab_size"), "context_length": hf.get("n_positions", hf.get("n_ctx")),
             "emb_dim": hf.get("n_embd"), "n_layers": hf.get("n_layer"), "n_heads": hf.get("n_head")}
    if wrong := {name: value for name, value in sizes.items() if type(value) is not int or value < 1}:
        raise ValueError(f"{where}: vocab_size, n_positions, n_embd, n_layer and n_head must be positive "
                         f"integers; got {quoted(wrong)} (in GPTConfig's names)")
    try:
        cfg = GPTConfig(**sizes)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    gpt2_only = {  # the value GPTModel implements first: it is also transformers' default
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"), "n_inner": (None, 4 * cfg.emb_dim),
        "layer_norm_epsilon": (1e-5,), "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,)}
    for key, allowed in gpt2_only.items():
        value = hf.get(key, allowed[0])
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):  # in Python, 1 == True
            raise ValueError(f"{where}: {key}={quoted(value)} is not GPT-2's ({allowed[0]!r}); GPTModel cannot load it")
    return cfg


# --------------------------------------------------------------------------- .safetensors files
#
# A .safetensors file: 8 bytes (little-endian header length N), N bytes of JSON {"name": {"dtype": "F32",
# "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {..}}, then every tensor's raw bytes.

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100_000_000  # the official library's limit


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: where a tensor's bytes lie in the data region that follows the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """A safetensors header, validated (`check_header`): (tensor infos, metadata, offset of the data)."""
    try:
        with open_regular(path) as file:
            file_size = os.fstat(file.fileno()).st_size
            header_size = int.from_bytes(prefix := file.read(8), "little")
            if len(prefix) < 8 or header_size > min(file_size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"{path}: truncated or not a safetensors file ({file_size} bytes, header "
                                 f"length {header_size if len(prefix) == 8 else '?'}, at most {MAX_HEADER_BYTES})")
            raw_header = file.read(header_size)
    except OSError as error:
        raise ValueError(f"{path}: cannot read the file ({error.strerror or error})") from None
    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as error:  # JSON and UTF-8 errors are ValueErrors
        raise ValueError(f"{path}: header is not valid JSON ({error})") from None
    return (*check_header(header, file_size - 8 - header_size, path), 8 + header_size)


def read_safetensors(path: str | Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (those in `names` only, if given), bytes straight from
    disk into each tensor; the whole header is checked first, and any damage is a ValueError."""
    infos, _, data_start = read_header(path)
    tensors = {}
    try:
        with open_regular(path) as file:
            for name, info in infos.items():
                if names is None or name in names:
                    buffer = bytearray(info.end - info.begin)
                    file.seek(data_start + info.begin)
                    if file.readinto(buffer) != len(buffer):
                        raise ValueError(f"{path}: tensor {quoted(name)}: the file ended early "
                                         "(changed while reading?)")
                    dtype = SAFETENSORS_DTYPES[info.dtype]
                    tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
                    tensors[name] = tensor.reshape(info.shape)  # shares the buffer: no copy
    except OSError as error:
        raise ValueError(f"{path}: cannot read the file ({error.strerror or error})") from None
    return tensors


# --------------------------------------------------------------------------- untrusted input
#
# A config.json, an index of shards or a safetensors header may come from anyone. Each check below
# turns what would be a crash, a hang, a huge allocation or a wrong model into one ValueError line.

MAX_JSON_BYTES = 16 * 2**20  # a config.json holds a few KB, the index of a large model's shards ~100 KB


def read_json(path: str | Path) -> object:
    """A small JSON file (config.json, model.safetensors.index.json, tokenizer_config.json...) read
    within bounds: ValueError naming it when it is not a regular file once links are followed (a
    named pipe would wait forever, /dev/zero never ends), holds more than MAX_JSON_BYTES, is not
    UTF-8, or is not JSON (nesting deep enough to exhaust the stack included)."""
    try:
        with open_regular(path) as file:
            raw = file.read(MAX_JSON_BYTES + 1)
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"{path}: larger than {MAX_JSON_BYTES} bytes, too large for a configuration file")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not a UTF-8 JSON file ({error})") from None


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for binary reading if, links followed, it is a regular file; else OSError.
    Opened without blocking, then checked: opening a named pipe would wait for a writer."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # a folder, a pipe, a device such as /dev/zero
        os.close(descriptor)
        raise OSError("not a regular file")
    return os.fdopen(descriptor, "rb")


def quoted(value: object, limit: int = 200) -> str:
    """repr(value), cut to `limit` characters: an error line quotes a hostile file, never all of it."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deep to show>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_config(cfg: GPTConfig) -> None:
    """GPTConfig's check: a config GPTModel can build, from code or from a config.json."""
    sizes = {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length, "emb_dim": cfg.emb_dim,
             "n_heads": cfg.n_heads}  # `type(size) is int`: JSON true is not a size
    wrong = {name: size for name, size in sizes.items() if type(size) is not int or size < 1}
    if type(cfg.n_layers) is not int or cfg.n_layers < 0:
        wrong["n_layers"] = cfg.n_layers
    if wrong:
        raise ValueError(f"GPTConfig: sizes must be integers >= 1 (n_layers >= 0); got {quoted(wrong)}")
    if cfg.emb_dim % cfg.n_heads:
        raise ValueError(f"emb_dim {cfg.emb_dim} is not divisible by n_heads {cfg.n_heads}")
    if max(cfg.vocab_size, cfg.context_length, 4 * cfg.emb_dim) * cfg.emb_dim >= 2**60:  # torch counts bytes in 64 bits
        raise ValueError(f"GPTConfig: emb_dim {cfg.emb_dim}, vocab_size {cfg.vocab_size} and context_length "
                         f"{cfg.context_length} make a weight larger than any memory")
    if type(cfg.drop_rate) not in (int, float) or not 0 <= cfg.drop_rate < 1 or type(cfg.qkv_bias) is not bool:
        raise ValueError(f"GPTConfig: drop_rate {quoted(cfg.drop_rate)} must be a number in [0, 1) "
                         f"and qkv_bias {quoted(cfg.qkv_bias)} true or false")


def check_weight_map(index: object, where: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map: tensor name -> a .safetensors file in the same
    folder (a name like ../x.safetensors would read elsewhere)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map and all(
            isinstance(shard, str) and shard == Path(shard).name and shard.endswith(".safetensors")
            for shard in weight_map.values())):
        raise ValueError(f"{where}: weight_map must map tensor names to .safetensors files in the same folder; "
                         f"got {quoted(weight_map)}")
    return weight_map


def check_header(header: object, data_size: int, path: object) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """A safetensors header's (tensor infos, metadata): known dtypes, sizes that fit 64 bits, and
    data_offsets that tile the data region exactly: no overlap, no gap, no byte left over."""
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    infos = {}
    for name, entry in header.items():
        dtype, shape, offsets = (entry.get(key) for key in ("dtype", "shape", "data_offsets")) if isinstance(
            entry, dict) else (None, None, None)
        if not (isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES and isinstance(shape, list)
                and all(type(size) is int and size >= 0 for size in shape)
                and math.prod(max(size, 1) for size in shape) < 2**63  # even an empty tensor's sizes must fit
                and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise ValueError(f"{path}: tensor {quoted(name)}: {quoted(entry)} is not a dtype (one of "
                             f"{', '.join(SAFETENSORS_DTYPES)}), a shape of sizes >= 0 and data_offsets "
                             f"[begin, end] within the {data_size}-byte data region")
        if (needed := math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize) != offsets[1] - offsets[0]:
            raise ValueError(f"{path}: tensor {quoted(name)}: data_offsets {offsets} hold {offsets[1] - offsets[0]} "
                             f"bytes, but shape {quoted(shape)} of {dtype} needs {needed}")
        infos[name] = TensorInfo(dtype, tuple(shape), *offsets)
    spans = sorted((info.begin, info.end) for info in infos.values())
    if [begin for begin, _ in spans] + [data_size] != [0] + [end for _, end in spans]:
        raise ValueError(f"{path}: the tensors' data_offsets must cover the {data_size}-byte data region "
                         "exactly, with no overlap and no gap")
    return infos, metadata


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads hook: a name given twice would be read differently by readers that keep the first."""
    if len(found := dict(pairs)) < len(pairs):
        raise ValueError(f"a key is given twice, among {quoted([key for key, _ in pairs])}")
    return found


# --------------------------------------------------------------------------- GPT-2's four sizes

PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
}


if __name__ == "__main__":  # the command lives in hub.py, which downloads presets and tokenizes (tiktoken)
    try:
        import hub
    except ImportError:  # gpt.py copied alone: the library works, the command needs hub.py
        print("error: python gpt.py needs hub.py beside it (and tiktoken); the library needs torch alone",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(hub.generate_command(sys.modules[__name__]))  # this very module: gpt.py is not imported twice
