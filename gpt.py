"""GPT-2 in pure PyTorch: the pretrained model that chapter 06 turns into a classifier.

Step 3 of the chapter's pipeline ("GPT"): token ids in, one hidden vector per token out.
The file reads in the order data flows: configuration, attention, feed-forward, block,
model. Module names are the GPT-2 checkpoint's own (`wte`, `h.0.attn.c_attn`, `ln_f`, ...),
so loading pretrained weights is a rename table, not a wall of assignments.

It depends on torch alone, so it can be copied into another project on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
