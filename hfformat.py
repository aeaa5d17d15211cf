"""The classifier in Hugging Face's format, out and in: machinery the chapter never mentions.

Out: `export_classifier` writes a trained classifier as a folder that transformers'
`GPT2ForSequenceClassification.from_pretrained` loads with nothing missing and nothing unused,
with GPT-2's tokenizer beside it (`python classify.py --model RUN_DIR --export-hf OUT_DIR`).
In: `read_classifier` reads a folder that transformers saved from a GPT2ForSequenceClassification
(classify.load_classifier calls it); gpt.load_gpt2 reads the backbone of such a folder, or of a
GPT2LMHeadModel's. Weights are written as .safetensors, Hugging Face's format, by
`write_safetensors`, here and in a run folder (runfiles.py); gpt.py reads them.

The two classes compute the same thing in two places where they differ in form:

- The head. Ours is Linear(C, K) with a bias b; transformers' `score` has no bias. The final
  LayerNorm's output feeds only the head, so with W the head's weight and beta ln_f's bias,
      logits = W (gamma * n + beta) + b = W (gamma * n + beta'),   beta' = beta + pinv(W) b,
  exactly whenever W pinv(W) b = b, which holds for any head with K <= C independent rows (a
  trained head's rows are: its K is 2 or a few, C is 768 or more). The export writes beta' as
  ln_f's bias and measures, in float64, what the fold changes in the logits after beta' is
  rounded to float32 (`fold_head_bias`); a head whose bias cannot be folded is refused.
- The text's vector. Ours is the last real token (`lengths - 1`); transformers reads the
  rightmost token that is not `pad_token_id`. The export writes pad_token_id 50256
  (<|endoftext|>), which our tokenizer never puts inside a text (a literal "<|endoftext|>" is
  ordinary text), so on right-padded batches both read the same position. An empty text is the
  single token 50256 for classify.py; transformers, finding no other token, reads position 0:
  that same token. Pooling other than "last" has no equivalent there and is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

import gpt
import hub

ARCHITECTURE = "GPT2ForSequenceClassification"
PAD_TOKEN_ID = 50256  # <|endoftext|>: GPT-2 has no pad token, and the book pads with this one
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"  # save_pretrained's names
MAX_FOLD_ERROR = 1e-4  # in logits; a well-conditioned head's fold changes them by about 1e-7


# --------------------------------------------------------------------------- .safetensors, written


def write_safetensors(file: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (and string metadata) as .safetensors, the file gpt.read_safetensors reads, into an
    open binary file; ValueError, before the first byte, for what the format cannot hold. For a whole
    file on disk or none: `with hub.atomic_open(path) as file: write_safetensors(file, tensors)`.
    Tensors that share storage (GPT-2's tied embedding and output head) are each written in full."""
    names = {dtype: name for name, dtype in gpt.SAFETENSORS_DTYPES.items()}
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"metadata must map strings to strings, got {gpt.quoted(metadata)}")
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__" or getattr(tensor, "dtype", None) not in names:
            what = getattr(tensor, "dtype", type(tensor).__name__)
            raise ValueError(f"tensor {gpt.quoted(name)}: cannot store a {what} under that name "
                             f"(dtypes: {', '.join(gpt.SAFETENSORS_DTYPES)})")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the data starts 8-byte aligned
    file.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
    for tensor in tensors.values():
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # (numel,): 0-d becomes (1,)
        buffer = bytearray(flat.numel() * flat.element_size())  # little-endian, as on every platform torch runs on
        if buffer:
            torch.frombuffer(buffer, dtype=torch.uint8).copy_(flat.view(torch.uint8))
        file.write(buffer)


# --------------------------------------------------------------------------- out: our classifier -> transformers


def fold_head_bias(weight: torch.Tensor, bias: torch.Tensor, ln_f_bias: torch.Tensor) -> tuple[torch.Tensor, float]:
    """ln_f's new bias beta' = beta + pinv(W) b, so that W beta' = W beta + b: the head's bias moved
    into the LayerNorm before it. Returns beta' (float32) and the largest change the fold makes to
    any logit, measured in float64 with beta' as stored: (K,) offsets W beta' - (W beta + b).
    ValueError when that change exceeds MAX_FOLD_ERROR (b outside the span of W's columns)."""
    w, b, beta = weight.double(), bias.double(), ln_f_bias.double()  # (K, C), (K,), (C,)
    folded = (beta + torch.linalg.pinv(w) @ b).float()  # (C,)
    error = (w @ folded.double() - (w @ beta + b)).abs().max().item()  # (K,) -> worst class
    if not error <= MAX_FOLD_ERROR * max(1.0, b.abs().max().item()):
        raise ValueError(f"the head's bias cannot be moved into ln_f's bias exactly (the {weight.shape[0]} rows "
                         f"of its weight are not independent: a logit would change by {error:.2g}); "
                         "transformers' score layer has no bias, so this head cannot be exported")
    return folded, error


def hf_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Our classifier's tensors (classify.classifier_tensors: "gpt.*", "head.*", LoRA merged) under
    GPT2ForSequenceClassification's names: "transformer." before GPT-2's own names, Conv1D weights
    transposed back to (in, out), the head as "score.weight", its bias folded into ln_f's.
    Returns them and the fold's largest logit change."""
    converted = {}
    for name, tensor in tensors.items():
        inner = name.removeprefix("gpt.")
        if inner == name or inner == "lm_head.weight":  # the head (below), or the tied vocabulary head
            continue
        conv1d = gpt.HF_CONV1D_WEIGHTS.fullmatch(inner)  # stored (in, out) by transformers
        converted[f"transformer.{inner}"] = tensor.t() if conv1d else tensor
    for name in [n for n in converted if n.endswith("attn.c_attn.weight")]:  # transformers' c_attn always has a
        converted.setdefault(name.replace("weight", "bias"), torch.zeros(converted[name].shape[1]))  # bias: 0
    converted["score.weight"] = tensors["head.weight"]  # (K, C), as nn.Linear keeps it
    converted["transformer.ln_f.bias"], error = fold_head_bias(tensors["head.weight"], tensors["head.bias"],
                                                               tensors["gpt.ln_f.bias"])
    return {name: tensor.float() for name, tensor in sorted(converted.items())}, error


def hf_config(cfg: gpt.GPTConfig, label_names: list[str]) -> dict:
    """config.json for GPT2ForSequenceClassification: GPT-2's sizes in transformers' names, the class
    names both ways, and <|endoftext|> as the pad token."""
    return {"architectures": [ARCHITECTURE], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "initializer_range": 0.02, "bos_token_id": PAD_TOKEN_ID, "eos_token_id": PAD_TOKEN_ID,
            "pad_token_id": PAD_TOKEN_ID, "tie_word_embeddings": True, "problem_type": "single_label_classification",
            "id2label": {str(i): name for i, name in enumerate(label_names)},
            "label2id": {name: i for i, name in enumerate(label_names)}}


def tokenizer_files(max_length: int) -> dict[str, bytes]:
    """GPT-2's tokenizer as transformers' GPT2Tokenizer reads it (AutoTokenizer, pipeline): the BPE
    files this repository ships, under transformers' names, and a config that pads with
    <|endoftext|> on the right and cuts texts to the run's max_length, keeping their start as
    classify.py does. ValueError (one line) when the shipped files are missing or damaged: a folder
    without them would not load in transformers' pipeline."""
    try:
        texts = hub.read_gpt2_bpe(hub.GPT2_BPE_DIR)
    except (OSError, ValueError) as error:
        raise ValueError(f"GPT-2's tokenizer files, which an export must hold: {' '.join(str(error).split())}; "
                         f"restore them (git checkout -- {hub.GPT2_BPE_DIR.name}) and export again") from None
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "padding_side": "right",
              "truncation_side": "right", "add_prefix_space": False, "bos_token": hub.END_OF_TEXT,
              "eos_token": hub.END_OF_TEXT, "unk_token": hub.END_OF_TEXT, "pad_token": hub.END_OF_TEXT}
    return {"vocab.json": texts["encoder.json"].encode("utf-8"), "merges.txt": texts["vocab.bpe"].encode("utf-8"),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode("utf-8")}


@dataclass
class Export:
    """What `export_classifier` wrote."""

    folder: Path
    label_names: list[str]
    fold_error: float

    def describe(self) -> str:
        return (f"exported to {self.folder}: {ARCHITECTURE} with {len(self.label_names)} labels "
                f"({', '.join(self.label_names)}) and GPT-2's tokenizer; the head's bias now sits in ln_f's bias (the "
                f"largest logit change this makes: {self.fold_error:.1e}). Load it with transformers."
                f"GPT2ForSequenceClassification.from_pretrained({str(self.folder)!r})")


def export_classifier(tensors: dict[str, torch.Tensor], cfg: gpt.GPTConfig, label_names: list[str], pooling: str,
                      max_length: int, out_dir: str | Path) -> Export:
    """Write out_dir/config.json and out_dir/model.safetensors for GPT2ForSequenceClassification,
    and the tokenizer's files (`tokenizer_files`).

    `tensors` as classify.classifier_tensors gives them; `cfg`, `label_names`, `pooling` and
    `max_length` from the run's classify.ClassifierConfig. The folder appears only when complete;
    an existing non-empty out_dir is refused. ValueError (one line) for what transformers' class
    cannot express, and nothing written.
    """
    if pooling != "last":
        raise ValueError(f"pooling {pooling!r}: {ARCHITECTURE} reads the last token that is not padding, "
                         "so only a classifier trained with --pooling last can be exported")
    converted, fold_error = hf_tensors(tensors)
    files = {CONFIG_FILE: (json.dumps(hf_config(cfg, label_names), indent=2) + "\n").encode("utf-8"),
             **tokenizer_files(max_length)}
    try:
        with hub.staged_folder(out_dir, "--export-hf") as staging:
            with hub.atomic_open(staging / WEIGHTS_FILE) as file:
                write_safetensors(file, converted, metadata={"format": "pt"})  # as transformers wants
            for name, content in files.items():
                with hub.atomic_open(staging / name) as file:
                    file.write(content)
    except OSError as error:  # a full disk, say; the staged folder is gone
        raise ValueError(f"--export-hf {out_dir}: cannot write it ({error.strerror or error})") from None
    return Export(Path(out_dir), list(label_names), fold_error)


# --------------------------------------------------------------------------- in: transformers -> our classifier


def saved_by_transformers(folder: str | Path) -> bool:
    """True when `folder` holds a config.json written by transformers (it always names the
    model_type), not by classify.save_classifier; False when there is none. ValueError (one line)
    for a config.json that cannot be read: a named pipe, a link to /dev/zero, 1 GB, not JSON."""
    path = Path(folder) / CONFIG_FILE
    if not os.path.lexists(path):
        return False
    config = gpt.read_json(path)
    return isinstance(config, dict) and "model_type" in config and "format" not in config


def label_names_from(config: dict, num_labels: int, where: object) -> list[str]:
    """The class names from id2label ({"0": "negative", ...}); transformers' LABEL_0, LABEL_1, ...
    when it has none."""
    id2label = config.get("id2label")
    if id2label is None:
        return [f"LABEL_{i}" for i in range(num_labels)]
    names = [id2label.get(str(i)) for i in range(num_labels)] if isinstance(id2label, dict) else []
    if not all(isinstance(n, str) for n in names) or len(set(names)) != num_labels or len(id2label) != num_labels:
        raise ValueError(f"{where}: id2label {gpt.quoted(id2label)} must name each of the {num_labels} classes of "
                         f"score.weight once, under the keys '0' to '{num_labels - 1}'")
    return names


def read_classifier(folder: str | Path) -> tuple[gpt.GPTModel, torch.Tensor, list[str], int, str]:
    """A GPT2ForSequenceClassification folder saved by transformers: (the GPT-2 backbone, the score
    head's weight (K, C), the class names from id2label, the longest text in tokens: the tokenizer's
    model_max_length where tokenizer_config.json gives one, else the context length, and the side
    a longer text loses: its truncation_side, "right" unless it says "left"). Its weights
    may be one model.safetensors or shards. ValueError (one line) for a folder without a
    classification head, a head that is not finite, or a pad token classify.py would read differently."""
    folder = Path(folder)
    config = gpt.read_json(folder / CONFIG_FILE)
    shape = gpt.config_from_hf(config, folder / CONFIG_FILE)  # ValueError for a config.json that is not GPT-2's
    located = gpt.read_headers(folder)  # name -> (file, TensorInfo), whichever shard holds it
    if "score.weight" not in located:
        architectures = config.get("architectures")
        kind = ", ".join(map(str, architectures)) if isinstance(architectures, list) and architectures else "GPT-2"
        raise ValueError(f"{folder} holds {kind[:200]} without a classification head (no score.weight): "
                         f"fine-tune it first, python train.py --model {folder}")
    weights, info = located["score.weight"]
    num_labels, width = (info.shape + (0, 0))[:2]
    if len(info.shape) != 2 or width != shape.emb_dim or num_labels < 2 or info.dtype not in gpt.LOADABLE_DTYPES:
        raise ValueError(f"{weights}: score.weight is {info.dtype} of shape {info.shape}; expected a float tensor "
                         f"of shape (classes >= 2, {shape.emb_dim})")
    pad = config.get("pad_token_id")
    if pad is not None and not (type(pad) is int and pad >= PAD_TOKEN_ID):
        raise ValueError(f"{folder}: pad_token_id {gpt.quoted(pad)} is a token GPT-2's tokenizer emits inside texts, "
                         "where transformers would skip it and classify.py would not; classify.py reads folders whose "
                         f"pad_token_id is {PAD_TOKEN_ID} (<|endoftext|>), a new token, or null")
    label_names = label_names_from(config, num_labels, folder / CONFIG_FILE)
    tokenizer_path = folder / "tokenizer_config.json"  # optional; when there, readable
    tokenizer_config = gpt.read_json(tokenizer_path) if os.path.lexists(tokenizer_path) else {}
    tokenizer_config = tokenizer_config if isinstance(tokenizer_config, dict) else {}
    max_length, side = tokenizer_config.get("model_max_length"), tokenizer_config.get("truncation_side", "right")
    if side not in ("right", "left"):
        raise ValueError(f"{tokenizer_path}: truncation_side {gpt.quoted(side)} is neither right nor left")
    if not (type(max_length) is int and 1 <= max_length <= shape.context_length):  # transformers' "no limit": 1e30
        max_length = shape.context_length
    score = gpt.read_safetensors(weights, names={"score.weight"})["score.weight"].float()
    if not torch.isfinite(score).all():
        raise ValueError(f"{weights}: score.weight holds NaN or infinity: no text could be classified with it")
    return gpt.load_gpt2(folder, config=shape), score, label_names, max_length, side
