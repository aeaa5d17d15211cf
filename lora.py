"""LoRA: low-rank adapters, the strategy that trains no pretrained weight at all.

Beyond the chapter's "Estratégias de Fine-Tuning" (head, the last blocks, everything, gradual
unfreezing): `classify.apply_strategy(model, "lora")` wraps the attention and MLP projections of
every block in `LoRALinear` and trains only the adapters, the head and the final LayerNorm.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: y = W x + b + (alpha / r) B A x.

    A (r, in) starts random (Kaiming uniform, as nn.Linear's weight), B (out, r) at zero, so at
    insertion the layer computes exactly what the base layer did, and training moves r * (in +
    out) numbers per layer instead of in * out. `weight` and `bias` keep their names, so the
    checkpoint names do not change and merging is `weight + (alpha / r) B A`.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if not (rank >= 1 and math.isfinite(alpha)):
            raise ValueError(f"lora rank {rank} and alpha {alpha}: need a rank >= 1 and a finite alpha")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), pretrained
        self.register_parameter("bias", base.bias)  # (out,) or None
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))  # (out, r)
        self.alpha, self.scale = alpha, alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., out), through rank r
        return F.linear(x, self.weight, self.bias) + self.scale * update  # (..., out)

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A)  # (out, in)


LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # in every block


def add_lora(model: nn.Module, rank: int, alpha: float) -> None:
    """Wrap the attention and MLP projections of every block of a classify.GPTClassifier in
    `LoRALinear` (once)."""
    for block in model.gpt.h:
        for path in LORA_TARGETS:
            parent_name, layer_name = path.split(".")
            parent = getattr(block, parent_name)
            if not isinstance(getattr(parent, layer_name), LoRALinear):
                setattr(parent, layer_name, LoRALinear(getattr(parent, layer_name), rank, alpha))
