"""GPT-2 in pure PyTorch: the pretrained model that chapter 06 turns into a classifier.

Step 3 of the chapter's pipeline ("GPT"): token ids in, one hidden vector per token out. The file
reads in the order data flows: configuration, attention, feed-forward, block, model; then mapping
pretrained weights onto it (`load_gpt2`: module names are the checkpoint's own, `wte`,
`h.0.attn.c_attn`, `ln_f`..., so that is a rename table) and reading the .safetensors files they
come in. It needs torch alone, copied into another project on its own. Downloading a preset is
hub.py's job, as is the check that weights speak English: `python gpt.py "Every effort moves"`.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # torch warns at import when NumPy is missing; this project does not use NumPy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model; the defaults are gpt2-small (124M parameters)."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0  # the book fine-tunes without dropout
    qkv_bias: bool = True  # GPT-2's query/key/value projection has a bias

    def __post_init__(self) -> None:
        sizes = {"vocab_size": self.vocab_size, "context_length": self.context_length, "emb_dim": self.emb_dim,
                 "n_heads": self.n_heads}  # `type(size) is int`: JSON true is not a size
        wrong = {name: size for name, size in sizes.items() if type(size) is not int or size < 1}
        if type(self.n_layers) is not int or self.n_layers < 0:
            wrong["n_layers"] = self.n_layers
        if wrong:
            raise ValueError(f"GPTConfig: sizes must be integers >= 1 (n_layers >= 0); got {wrong}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if type(self.drop_rate) not in (int, float) or not 0 <= self.drop_rate < 1 or type(self.qkv_bias) is not bool:
            raise ValueError(f"GPTConfig: drop_rate {self.drop_rate!r} must be a number in [0, 1) "
                             f"and qkv_bias {self.qkv_bias!r} true or false")


PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
}


def causal_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     dropout: nn.Module) -> torch.Tensor:
    """Scaled dot-product attention under a causal mask, step by step: queries, keys, values (B, H,
    T, hs). The version a reader follows; `CausalSelfAttention` calls PyTorch's fused kernel by
    default, and a test proves them equal."""
    num_tokens, head_dim = queries.shape[-2], queries.shape[-1]
    attn_scores = queries @ keys.transpose(-2, -1)  # (B, H, T, T)
    attn_scores = attn_scores / math.sqrt(head_dim)  # keeps softmax out of its flat tails
    # Causal mask: position t may only look at positions <= t, never at the future.
    future = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=queries.device).triu(1)
    attn_scores = attn_scores.masked_fill(future, float("-inf"))  # (B, H, T, T)
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
    """Pretrained GPT-2 in eval mode from a Hugging Face folder (config.json + model.safetensors)
    or a .safetensors file, strictly: every tensor present, none unknown, each shape right.

    `config` overrides the architecture read or inferred from the source. F32, F16 and BF16 files
    load into float32, each tensor becoming a parameter of a model built on the meta device: one
    copy of the weights in memory, not two. A preset's weights come through hub.py:
    `gpt.load_gpt2(hub.fetch("gpt2-small"))`.
    """
    cfg = config if config is not None else load_config(source)
    if isinstance(source, str) and source in PRESETS:
        raise ValueError(f"{source} is a preset: download its weights with hub.py, "
                         f"gpt.load_gpt2(hub.fetch({source!r})), or pass a local folder or .safetensors file")
    path = _local(source)
    if path.is_dir() and not (path := path / "model.safetensors").is_file():
        raise ValueError(f"{path.parent} has no model.safetensors (save with safe_serialization=True)")
    infos, _, _ = read_header(path)
    blocks = {match.group(1) for name in infos if (match := re.match(r"(?:transformer\.)?h\.(\d+)\.", name))}
    if cfg.n_layers > len(blocks):  # checked before building anything: a config may claim a billion blocks
        raise ValueError(f"{path}: the config says {cfg.n_layers} blocks, the file holds {len(blocks)}")
    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        model = GPTModel(cfg)
    expected = {name: tuple(param.shape)[:: -1 if HF_CONV1D_WEIGHTS.fullmatch(name) else 1]
                for name, param in model.named_parameters()}  # as the file stores them
    found = {gpt2_name(name): info for name, info in infos.items() if gpt2_name(name)}
    for name, want in expected.items():
        if name not in found:
            raise ValueError(f"{path}: tensor {name} (shape {want}) is missing from the file")
    for name, info in found.items():
        want = expected.get(name, expected["wte.weight"] if name == "lm_head.weight" else None)
        if want is None:
            raise ValueError(f"{path}: unknown tensor {name} (shape {info.shape}): GPTModel has no such weight")
        if info.shape != want:
            raise ValueError(f"{path}: tensor {name}: shape {info.shape} in file, model expects {want}")
        if info.dtype not in LOADABLE_DTYPES:
            raise ValueError(f"{path}: tensor {name} is {info.dtype}; weights load from {sorted(LOADABLE_DTYPES)}")
    state = {}
    for hf_name, tensor in iter_safetensors(path):
        name = gpt2_name(hf_name)
        if name is not None:
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{path}: tensor {hf_name} holds NaN or infinity")
            tensor = tensor.float()  # F16/BF16 files load into float32; F32 is not copied
            state[name] = tensor.t().contiguous() if HF_CONV1D_WEIGHTS.fullmatch(name) else tensor
    if "lm_head.weight" in state and not torch.equal(state.pop("lm_head.weight"), state["wte.weight"]):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight, but GPTModel ties its output head "
                         "to the token embedding (as GPT-2 does); this checkpoint cannot load into it")
    model.load_state_dict(state, strict=False, assign=True)  # the checks above were the strict ones
    model.lm_head.weight = model.wte.weight  # assign replaced wte's Parameter: tie the head again
    return model.eval()


def _local(source: str | Path) -> Path:
    """`source` as a local Hugging Face folder or .safetensors file."""
    path = Path(source)
    if path.is_dir() or (path.is_file() and path.suffix == ".safetensors"):
        return path
    raise ValueError(f"{source!r} is neither a preset ({', '.join(PRESETS)}), a Hugging Face model directory "
                     "(config.json + model.safetensors) nor a .safetensors file")


def load_config(source: str | Path) -> GPTConfig:
    """The architecture of a preset name, a Hugging Face folder (its config.json), or a
    .safetensors file (inferred from the tensor shapes in its header)."""
    if isinstance(source, str) and source in PRESETS:
        return PRESETS[source]
    path = _local(source)
    if not path.is_dir():
        infos, metadata, _ = read_header(path)
        return config_from_shapes({name: info.shape for name, info in infos.items()}, metadata, path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
    return config_from_hf_json(path / "config.json")


def config_from_shapes(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], source: object) -> GPTConfig:
    """Sizes come from the tensor shapes; the head count, which no shape holds, from the metadata
    (`n_head`, Hugging Face's name, or `n_heads`) or else from GPT-2's 64-wide heads."""
    shapes = {name.removeprefix("transformer."): shape for name, shape in shapes.items()}
    if len(shapes.get("wte.weight", ())) != 2 or len(shapes.get("wpe.weight", ())) != 2:
        raise ValueError(f"{source}: no 2-d wte.weight and wpe.weight: not a GPT-2 checkpoint")
    (vocab_size, emb_dim), context_length = shapes["wte.weight"], shapes["wpe.weight"][0]
    layers = {int(match.group(1)) for name in shapes if (match := re.match(r"h\.(\d+)\.", name))}
    heads = metadata.get("n_head", metadata.get("n_heads"))
    if heads is None and emb_dim % HF_HEAD_DIM:
        raise ValueError(f"{source}: cannot infer the number of heads of a {emb_dim}-wide model; "
                         "pass config=GPTConfig(...) or add n_head to the file's metadata")
    try:
        return GPTConfig(vocab_size, context_length, emb_dim, len(layers),
                         int(heads) if heads is not None else emb_dim // HF_HEAD_DIM,
                         qkv_bias="h.0.attn.c_attn.bias" in shapes or not layers)
    except ValueError as error:
        raise ValueError(f"{source}: inconsistent GPT-2 shapes or metadata ({error})") from None


def config_from_hf_json(path: Path) -> GPTConfig:
    """GPTConfig from a Hugging Face config.json; variants GPTModel does not implement are refused."""
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: a config.json must hold a JSON object")
    sizes = {"vocab_size": hf.get("vocab_size"), "context_length": hf.get("n_positions", hf.get("n_ctx")),
             "emb_dim": hf.get("n_embd"), "n_layers": hf.get("n_layer"), "n_heads": hf.get("n_head")}
    wrong = {name: value for name, value in sizes.items() if type(value) is not int or value < 1}
    if wrong:
        raise ValueError(f"{path}: vocab_size, n_positions, n_embd, n_layer and n_head must be positive "
                         f"integers; got {wrong} (in GPTConfig's names)")
    try:
        cfg = GPTConfig(**sizes)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * cfg.emb_dim)),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ValueError(f"{path}: {key}={value!r} is not GPT-2's ({allowed[0]!r}); GPTModel cannot load it")
    return cfg


# --------------------------------------------------------------------------- .safetensors files
#
# A .safetensors file: 8 bytes (little-endian header length N), N bytes of JSON {"name": {"dtype": "F32",
# "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {..}}, then every tensor's raw bytes.
# Most of the code checks that a damaged file can never become a wrong tensor. hub.py writes them.

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


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads hook: a name given twice would silently keep only its last entry."""
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError(f"duplicate key among {[key for key, _ in pairs][:5]}")
    return dict(pairs)


def _tensor_info(where: str, entry: object, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ValueError(f"{where}: entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
    if not (isinstance(shape, list) and all(type(size) is int and size >= 0 for size in shape)
            and math.prod(max(size, 1) for size in shape) < 2**63):  # even an empty tensor's sizes must fit int64
        raise ValueError(f"{where}: shape {shape!r} is not a list of sizes >= 0 that fit 64 bits")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(offset) is int for offset in offsets)):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise ValueError(f"{where}: data_offsets {offsets} fall outside the {data_size}-byte data region")
    needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != needed:
        raise ValueError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, "
                         f"but shape {shape} of {dtype} needs {needed}")
    return TensorInfo(dtype, tuple(shape), begin, end)


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header: (tensor infos, metadata, offset of the data)."""
    try:
        if not Path(path).is_file():  # a folder, FIFO or device: opening one could block forever
            raise OSError("not a regular file")
        file_size = Path(path).stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            header_size = int.from_bytes(prefix, "little")
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
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    data_size = file_size - 8 - header_size
    infos = {name: _tensor_info(f"{path}: tensor {name!r}", entry, data_size) for name, entry in header.items()}
    position, previous = 0, None  # the tensors must tile the data region: no overlap, no gap, no rest
    for name, info in sorted(infos.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            problem = f"overlaps tensor {previous!r}" if info.begin < position else f"leaves a gap at {position}"
            raise ValueError(f"{path}: tensor {name!r} {problem}")
        position, previous = info.end, name
    if position != data_size:
        raise ValueError(f"{path}: the tensors cover {position} bytes of a {data_size}-byte data region")
    return infos, metadata, 8 + header_size


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of a .safetensors file, bytes straight from disk into the
    tensor; the whole header is checked before the first tensor is read."""
    infos, _, data_start = read_header(path)
    try:
        with open(path, "rb") as file:
            for name, info in infos.items():
                buffer = bytearray(info.end - info.begin)
                file.seek(data_start + info.begin)
                if file.readinto(buffer) != len(buffer):
                    raise ValueError(f"{path}: tensor {name!r}: the file ended early (changed while reading?)")
                dtype = SAFETENSORS_DTYPES[info.dtype]
                tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
                yield name, tensor.reshape(info.shape)  # shares the buffer: no copy
    except OSError as error:
        raise ValueError(f"{path}: cannot read the file ({error.strerror or error})") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file; any damage raises ValueError naming file and tensor."""
    return dict(iter_safetensors(path))


if __name__ == "__main__":  # the command lives in hub.py, which downloads presets and tokenizes (tiktoken)
    try:
        import hub
    except ImportError:  # gpt.py copied alone: the library works, the command needs hub.py
        raise SystemExit("python gpt.py needs hub.py beside it (and tiktoken); the library needs torch alone")
    raise SystemExit(hub.generate_command())
