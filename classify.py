"""From generative model to classifier: the head, the text's representation, what trains, and use.

Chapter 06, in its order: "Transformando um modelo generativo em classificador" and "Extraindo
representações do modelo" (GPT-2's hidden states instead of its vocabulary logits),
"Classification Head" (a new Linear(C, K)), "Como escolher a representação do texto" (`pool`),
"Estratégias de Fine-Tuning" with "Fine-Tuning Completo" and "Congelamento de Camadas"
(`apply_strategy`; LoRA's adapters in lora.py), and "Inferência e uso prático do modelo" (save,
load, `predict`; the command `python classify.py --model RUN_DIR "text" ...` reads and prints
through report.py). In the pipeline: steps 4 (representation) and 5 (classification head), and
what step 7 (weight update) may touch.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__":  # torch warns at import when NumPy is missing; this project does not use NumPy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch
from torch import nn
from torch.nn import functional as F

import data
import gpt
import hfformat
import runfiles
from lora import LoRALinear, add_lora

POOLINGS = ("last", "mean", "special", "first")


# --------------------------------------------------------------------------- the classifier


class GPTClassifier(nn.Module):
    """GPT-2 whose vocabulary head is replaced by a classification head Linear(C, K).

    `forward(token_ids (B, T), lengths (B,))` returns class logits (B, K): the embeddings and
    GPT-2's blocks give one hidden vector per token, `pool` picks the text's vector after the
    final LayerNorm, and the head maps it to one logit per class. Texts are padded on the right;
    under the causal mask no real position attends to a pad after it, so padding never changes a
    prediction. GPT-2's own `lm_head` (C -> 50,257 vocabulary logits) is never computed.

    Two steps skip work whose result nothing reads, and change no number (tests/test_classify.py
    proves forward equal to the plain `head(pool(gpt.hidden_states(token_ids)))`):
    - the head reads one position per text, so the final block computes only that one
      (`last_position_block`; "Como escolher a representação do texto");
    - frozen blocks give the same output every epoch, so train.py computes it once and training
      continues from it: `forward(stored, lengths, start_block=k)` takes the stored output of
      blocks[:k] (B, T, C) in place of token ids ("Congelamento de Camadas"; fastpath.PrefixCache).
    """

    def __init__(self, gpt_model: gpt.GPTModel, num_classes: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if num_classes < 2:
            raise ValueError(f"num_classes {num_classes}: a classifier needs at least 2 classes")
        self.gpt = gpt_model
        self.head = nn.Linear(gpt_model.cfg.emb_dim, num_classes)  # the new classification head
        self.pooling = pooling

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor, start_block: int = 0) -> torch.Tensor:
        if start_block == 0:
            inputs, lengths = self.embed(inputs, lengths)  # token ids (B, T) -> (B, T, C)
        hidden, blocks = inputs, self.gpt.h[start_block:]  # else: the frozen blocks' stored output
        if self.pooling in ("last", "special") and len(blocks) > 0:
            for block in blocks[:-1]:
                hidden = block(hidden)  # (B, T, C)
            text = last_position_block(blocks[-1], hidden, lengths)  # (B, C): only where the head reads
            return self.head(self.gpt.ln_f(text))  # (B, K)
        for block in blocks:
            hidden = block(hidden)  # (B, T, C)
        return self.head(pool(self.gpt.ln_f(hidden), lengths, self.pooling))  # (B, C) -> (B, K)

    def embed(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first block's input (B, T, C) and the lengths it holds. "special" appends
        <|endoftext|> first; "first" keeps position 0 alone, which under the causal mask never
        reads further, so no later position needs computing."""
        if self.pooling == "special":
            token_ids, lengths = append_special_token(token_ids, lengths)  # (B, T + 1), (B,)
        hidden = self.gpt.embed(token_ids)  # (B, T, C): token + position embeddings
        return (hidden[:, :1], torch.ones_like(lengths)) if self.pooling == "first" else (hidden, lengths)


def longest_text(gpt_config: gpt.GPTConfig, pooling: str) -> int:
    """The most tokens of a text the classifier reads: the context, less the appended special token."""
    return gpt_config.context_length - (pooling == "special")


def last_token_index(lengths: torch.Tensor) -> torch.Tensor:
    """Index of each sequence's last real token.

    Under a causal mask only the last position has seen the whole text, which is why the
    book classifies from it (chapter section "Como escolher a representação do texto").
    """
    return lengths - 1  # (B,)


def append_special_token(token_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write <|endoftext|> right after each text: (B, T) -> (B, T + 1), lengths + 1.

    The chapter's third representation, "usar tokens especiais": a token that means "the text
    ends here", whose position reads the whole text. GPT-2 has one special token, and it is also
    the pad token, so by value it cannot be told from padding; `lengths` can: the token at
    position lengths[b] now counts as real, and the pads after it stay invisible to it under
    the causal mask.
    """
    token_ids = F.pad(token_ids, (0, 1), value=data.PAD_TOKEN_ID)  # (B, T + 1): room for the longest text
    rows = torch.arange(len(lengths), device=lengths.device)  # (B,)
    token_ids[rows, lengths] = data.END_OF_TEXT_ID
    return token_ids, lengths + 1


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per text from its hidden states (B, T, C) -> (B, C).

    Padding sits on the right, after each text's `lengths[b]` real tokens:
    - "last": the last real token, the book's choice: the only position whose attention has
      read every token of the text;
    - "mean": the mean over real tokens (pads are masked out);
    - "special": the <|endoftext|> appended to each text (`append_special_token`), which is then
      its last real token;
    - "first": position 0, which under the causal mask has seen only the first token: the
      contrast that shows why GPT classifiers read the last.
    """
    if pooling in ("last", "special"):
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # (B,)
        return hidden[rows, last_token_index(lengths)]  # (B, C)
    if pooling == "mean":
        real = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]  # (B, T)
        summed = hidden.masked_fill(~real[..., None], 0.0).sum(dim=1)  # (B, C)
        return summed / lengths[:, None].to(hidden.dtype)  # (B, C)
    if pooling == "first":
        return hidden[:, 0]  # (B, C)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


def last_position_block(block: gpt.Block, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`block(hidden)` at each text's last real position only: (B, T, C) -> (B, C).

    The last token attends to every position, so keys and values are needed everywhere, but
    the query, the attention output, ln_2 and the MLP only at that one position: one query per
    text instead of T. Its causal mask, "positions <= last", also hides the pads after it.
    """
    attn = block.attn
    batch, num_tokens, emb_dim = hidden.shape
    rows, last = torch.arange(batch, device=hidden.device), last_token_index(lengths)  # (B,), (B,)
    normed = block.ln_1(hidden)  # (B, T, C)
    query = linear_outputs(attn.c_attn, normed[rows, last], 0, emb_dim)  # (B, C): c_attn's query rows only
    keys, values = linear_outputs(attn.c_attn, normed, emb_dim, 3 * emb_dim).chunk(2, dim=-1)  # 2 x (B, T, C)
    query = query.view(batch, attn.n_heads, 1, attn.head_dim)  # (B, H, 1, hs)
    keys, values = attn.split_heads(keys), attn.split_heads(values)  # (B, H, T, hs)
    visible = torch.arange(num_tokens, device=hidden.device) <= last[:, None]  # (B, T): up to its last token
    context = gpt.causal_attention(query, keys, values, attn.attn_dropout, visible[:, None, None, :])  # (B, H, 1, hs)
    context = context.reshape(batch, emb_dim)  # (B, C), heads side by side
    x = hidden[rows, last] + attn.resid_dropout(attn.c_proj(context))  # (B, C)
    return x + block.mlp(block.ln_2(x))  # (B, C)


def linear_outputs(layer: nn.Linear | LoRALinear, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """`layer(x)[..., start:stop]`, computing only those outputs (rows start:stop of the weight)."""
    bias = None if layer.bias is None else layer.bias[start:stop]
    out = F.linear(x, layer.weight[start:stop], bias)  # (..., stop - start)
    if isinstance(layer, LoRALinear):
        out = out + layer.scale * F.linear(F.linear(x, layer.lora_A), layer.lora_B[start:stop])
    return out


# --------------------------------------------------------------------------- fine-tuning strategies

STRATEGIES = ("head", "last-block", "last-N-blocks", "all", "gradual", "lora")


@dataclass(frozen=True)
class Strategy:
    """What fine-tuning trains. kind is "head", "last-blocks" (name "last-block" or
    "last-N-blocks", num_blocks N), "all", "gradual" or "lora"."""

    name: str
    kind: str
    num_blocks: int = 0


def parse_strategy(name: str) -> Strategy:
    """"head", "last-block", "last-N-blocks" (e.g. "last-2-blocks"), "all", "gradual" or "lora"."""
    if name in ("head", "all", "gradual", "lora"):
        return Strategy(name, name)
    match = re.fullmatch(r"last-(\d{1,6})-blocks", name) if name != "last-block" else None
    if name == "last-block" or (match and int(match.group(1)) >= 1):
        return Strategy(name, "last-blocks", int(match.group(1)) if match else 1)
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)} "
                     f"(last-N-blocks with N a number of blocks, e.g. last-2-blocks)")


def trainable_blocks(strategy: Strategy | str, n_layers: int, epoch: int = 0) -> int:
    """How many transformer blocks, counted from the top, train under `strategy` at `epoch`.

    "gradual" unfreezes gradually: epoch 0 trains the head and the final LayerNorm only, and each
    later epoch one more block from the top. "lora" trains adapters inside every block but no
    block's own weights, so it counts 0 here, as does "head".
    """
    strategy = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    if epoch < 0:
        raise ValueError(f"epoch {epoch}: must be 0 or more")
    if strategy.kind == "last-blocks" and strategy.num_blocks > n_layers:
        raise ValueError(f"strategy {strategy.name}: the model has only {n_layers} blocks; "
                         f"choose N in 1..{n_layers} (or 'all')")
    if strategy.kind == "last-blocks":
        return strategy.num_blocks
    if strategy.kind == "gradual":
        return min(epoch, n_layers)
    return n_layers if strategy.kind == "all" else 0


def apply_strategy(model: GPTClassifier, strategy: Strategy | str, epoch: int = 0, lora_rank: int = 8,
                   lora_alpha: float = 16) -> None:
    """Freeze and unfreeze ("Congelamento de Camadas"): set `requires_grad` on every parameter as
    `strategy` says (for "gradual", at `epoch`).

    The head always trains; the final LayerNorm trains under every strategy but "head" (it
    normalises exactly the vector the head reads); the token and position embeddings train only
    under "all" ("Fine-Tuning Completo"). "lora" inserts adapters on the first call and trains
    them, the head and the final LayerNorm; every pretrained weight stays frozen. Build the
    optimizer from `trainable_parameters(model)` afterwards, so weight decay never moves a
    frozen weight.
    """
    strategy = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    if strategy.kind != "lora" and any(isinstance(module, LoRALinear) for module in model.modules()):
        raise ValueError(f"strategy {strategy.name}: this model carries LoRA adapters; save and load it "
                         f"(which merges them) before training it with another strategy")
    blocks = model.gpt.h
    num_unfrozen = trainable_blocks(strategy, len(blocks), epoch)
    model.requires_grad_(strategy.kind == "all")
    model.head.requires_grad_(True)
    model.gpt.ln_f.requires_grad_(strategy.kind != "head")
    for block in blocks[len(blocks) - num_unfrozen :]:
        block.requires_grad_(True)
    if strategy.kind == "lora":
        add_lora(model, lora_rank, lora_alpha)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_A.requires_grad_(True)
                module.lora_B.requires_grad_(True)


def trains(module: nn.Module) -> bool:
    """True when any parameter of `module` is trainable."""
    return any(param.requires_grad for param in module.parameters())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets: only those that train."""
    return [param for param in model.parameters() if param.requires_grad]


# --------------------------------------------------------------------------- save and load


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a saved classifier and prepare its input text; `base`: the
    starting weights a folder of trained weights completes (runfiles.weights_identity), `lora`:
    the rank and alpha of the adapters such a folder holds."""

    gpt: gpt.GPTConfig
    label_names: list[str]
    pooling: str = "last"
    max_length: int = 1024  # longer texts keep their first max_length tokens
    tokenizer: str = "gpt2"
    base: dict[str, str] | None = None
    lora: dict[str, float] | None = None
    truncation_side: str = "right"  # "left": a longer text keeps its end (a transformers folder may say so)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def to_dict(self) -> dict:
        return {"format": runfiles.FORMAT, "format_version": runfiles.FORMAT_VERSION, "gpt": asdict(self.gpt),
                "num_classes": self.num_classes, "label_names": self.label_names, "pooling": self.pooling,
                "max_length": self.max_length, "tokenizer": self.tokenizer,
                **({"base": self.base} if self.base else {}), **({"lora": self.lora} if self.lora else {})}

    @classmethod
    def from_dict(cls, fields: object) -> ClassifierConfig:
        """Rebuild from `to_dict`'s output; a ValueError says what is wrong with any other input."""
        fields = runfiles.check_fields(fields)
        config = cls(gpt.GPTConfig(**fields["gpt"]), fields["label_names"], fields["pooling"], fields["max_length"],
                     fields["tokenizer"], fields.get("base"), fields.get("lora"))
        if config.pooling not in POOLINGS:
            raise ValueError(f"pooling {gpt.quoted(config.pooling)}: expected one of {', '.join(POOLINGS)}")
        longest = longest_text(config.gpt, config.pooling)
        if not (type(config.max_length) is int and 1 <= config.max_length <= longest):
            raise ValueError(f"max_length {gpt.quoted(config.max_length)}: must be an integer in 1..{longest}")
        return config


def classifier_tensors(model: GPTClassifier) -> dict[str, torch.Tensor]:
    """Every weight, by name: LoRA adapters merged into plain weights, the unused vocabulary head
    (tied to wte) left out."""
    tensors = dict(model.state_dict())
    tensors.pop("gpt.lm_head.weight", None)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            del tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
            tensors[f"{name}.weight"] = module.merged_weight()
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}


def save_classifier(model: GPTClassifier, run_dir: str | Path, label_names: list[str], max_length: int | None,
                    base: dict[str, str] | None = None) -> None:
    """Write run_dir/classifier.safetensors and run_dir/config.json (max_length None: the longest
    text the model reads). With `base`, the identity of the weights training started from
    (runfiles.weights_identity), only what trains is written, LoRA's adapters as they are; else
    every weight, LoRA merged, and the folder needs nothing else (runfiles.py)."""
    if len(label_names) != model.num_classes:
        raise ValueError(f"{len(label_names)} label names {label_names} for a {model.num_classes}-class head")
    trained = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    if len(trained) == len(dict(model.named_parameters())):  # "all": nothing left to find again
        base = None
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    lora = {"rank": adapters[0].lora_A.shape[0], "alpha": adapters[0].alpha} if adapters and base else None
    max_length = longest_text(model.gpt.cfg, model.pooling) if max_length is None else max_length
    config = ClassifierConfig(model.gpt.cfg, list(label_names), model.pooling, max_length, base=base, lora=lora)
    ClassifierConfig.from_dict(config.to_dict())  # the same checks as loading
    runfiles.write(run_dir, config.to_dict(), trained if base else classifier_tensors(model))


def load_classifier(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[GPTClassifier, ClassifierConfig]:
    """Rebuild a saved classifier in eval mode on `device`: all its weights from the folder, or its
    trained ones laid over the starting weights, found again and checked (runfiles.py). Nothing
    is unpickled; ValueError (one line) when the folder is missing, incomplete, corrupt, or its
    weights do not match its config. A folder saved by transformers' GPT2ForSequenceClassification
    loads too: its score head (with a zero bias), its id2label names."""
    run_dir = Path(run_dir)
    if hfformat.saved_by_transformers(run_dir):  # machinery: hfformat.py reads transformers' layout
        backbone, score, names, max_length, side = hfformat.read_classifier(run_dir)
        model = GPTClassifier(backbone, len(names))
        model.head.load_state_dict({"weight": score, "bias": torch.zeros(len(names))})  # score has no bias
        return model.to(device).eval(), ClassifierConfig(backbone.cfg, names, "last", max_length, truncation_side=side)
    fields, infos, weights_path = runfiles.read(run_dir)
    config = ClassifierConfig.from_dict(fields)
    blocks_in_file = {m.group(1) for name in infos if (m := re.match(r"gpt\.h\.(\d+)\.", name))}
    if config.base is None and len(blocks_in_file) != config.gpt.n_layers:
        raise ValueError(f"{weights_path} holds {len(blocks_in_file)} blocks, "
                         f"its config.json says {config.gpt.n_layers}")
    with torch.device("meta"):  # no memory and no random init: every weight comes from a file
        model = GPTClassifier(gpt.GPTModel(config.gpt), config.num_classes, config.pooling)
    if config.base is not None:  # the starting weights first, then what training changed over them
        model.gpt = gpt.load_gpt2(runfiles.find_weights(config.base), config=config.gpt)
        if config.lora:
            add_lora(model, config.lora["rank"], config.lora["alpha"])
    expected = {name: tensor for name, tensor in model.state_dict().items() if name != "gpt.lm_head.weight"}
    wanted = [name for name in expected if name in infos or config.base is None]  # trained ones only, over a base
    missing, unexpected = [name for name in wanted if name not in infos], sorted(infos.keys() - expected.keys())
    if missing or unexpected or not wanted:
        raise ValueError(f"{weights_path} does not match its config.json: missing tensors {missing[:3]}, "
                         f"unexpected tensors {unexpected[:3]}")
    for name in wanted:
        want = tuple(expected[name].shape)
        if infos[name].shape != want or infos[name].dtype not in gpt.LOADABLE_DTYPES:
            raise ValueError(f"tensor {name}: {infos[name].dtype} {infos[name].shape} in {weights_path}, "
                             f"its config.json expects a float tensor of shape {want}")
    tensors = gpt.read_safetensors(weights_path)
    if any(not torch.isfinite(tensor).all() for tensor in tensors.values()):
        raise ValueError(f"{weights_path}: a tensor holds NaN or infinity; this run cannot classify")
    model.load_state_dict({name: tensors[name].float() for name in wanted}, strict=False, assign=True)
    model.gpt.lm_head.weight = model.gpt.wte.weight  # re-tie the (unused) vocabulary head
    return model.to(device).eval(), config


# --------------------------------------------------------------------------- predict and the command line


@dataclass
class Prediction:
    text: str
    label: str
    probabilities: dict[str, float]


def prepare_tokens(tokenizer, text: str, max_length: int, truncation_side: str = "right") -> list[int]:
    """The token ids the classifier reads for `text`: its first max_length tokens, as in training
    (truncation_side "left": its last). An empty text becomes the single token <|endoftext|>: the
    model's view of "no text", which still gets a label and probabilities, never an error."""
    keep = "end" if truncation_side == "left" else "start"
    return data.encode_within(tokenizer, text, max_length, keep) or [data.END_OF_TEXT_ID]


def predict(model: GPTClassifier, config: ClassifierConfig, texts: list[str], batch_size: int = 32,
            device: torch.device | str | None = None, top: int | None = None) -> list[Prediction]:
    """Label and class probabilities for each text, in the order given ("Inferência e uso prático
    do modelo": tokenize, run the model, read the probabilities, pick the most likely class).

    Texts are tokenized (`prepare_tokens`), sorted by length so each batch carries little
    padding, run in eval mode without autograd, and returned in their original order. `device`
    moves the model there; None keeps it where it is. `top`: only the `top` most likely classes'
    probabilities, most likely first (a model of a million classes costs no more per text).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    tokenizer = data.get_tokenizer(config.tokenizer)
    if config.gpt.vocab_size < tokenizer.n_vocab:  # checked here, not at load: a tiny test model loads fine
        raise ValueError(f"the model embeds {config.gpt.vocab_size} tokens, GPT-2's tokenizer {tokenizer.n_vocab}")
    token_ids = [prepare_tokens(tokenizer, text, config.max_length, config.truncation_side) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: len(token_ids[i]))
    predictions: list[Prediction | None] = [None] * len(texts)
    names, shown = config.label_names, min(top or config.num_classes, config.num_classes)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = data.collate([(token_ids[i], 0) for i in chunk]).to(device)
                probabilities = torch.softmax(model(batch.token_ids, batch.lengths).float(), dim=-1)  # (B, K)
                values, classes = probabilities.topk(shown) if top else (probabilities, None)  # (B, top) or (B, K)
                for row, i in enumerate(chunk):
                    kept = [names[k] for k in classes[row].tolist()] if top else names
                    predictions[i] = Prediction(texts[i], names[int(probabilities[row].argmax())],
                                                dict(zip(kept, values[row].tolist())))
    finally:
        model.train(was_training)
    return predictions


if __name__ == "__main__":  # the command's reading and printing live in report.py, which never imports this file
    import report

    sys.exit(report.classify_command(sys.modules[__name__]))  # this very module: classify.py is not imported twice
