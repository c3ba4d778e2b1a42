"""Training recipes: each model's defaults for what the quality sweep tuned (peak lr, schedule, warmup), the lr and
weight-decay schedules, and AdamW's parameter groups.

BitNet and its fp twin are trained with their own recipe, each the best of the same sweep (docs/training.md, "The
recipe sweep"), so the comparison is between two tuned models, not one tuned and one borrowed setting. A value given
explicitly wins: `lr_bitnet`/`lr_fp` (--lr-bitnet, --lr-fp) for one model, then `lr` (--lr) for whichever model
is trained, then the recipe; the same for `schedule`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

SCHEDULES = ("cosine", "two_stage")
RECIPE_FIELDS = ("lr", "schedule", "warmup_frac")
PER_MODEL_FIELDS = ("lr", "schedule")  # also settable per model: --lr-bitnet, --schedule-fp, ...
# From the sweep on `small` (a quarter epoch; docs/training.md "The recipe sweep"): both twins are best at lr 2e-3
# of {1e-3, 2e-3, 4e-3} (BitNet ties at 4e-3 once warmup is long; fp diverges there), with a 25% warmup (word ppl
# -9% BitNet, -17% fp against 5%; seeds 0 and 1 at 25% differ by 5% and 2.4%). BitNet gains from the two-stage
# schedule, fp loses. SubLN loses for both (+45% BitNet, +35% fp), so ModelConfig.subln stays off.
RECIPES: dict[str, dict[str, Any]] = {
    "bitnet": {"lr": 2e-3, "schedule": "two_stage", "warmup_frac": 0.25},
    "fp": {"lr": 2e-3, "schedule": "cosine", "warmup_frac": 0.25},
}


def with_recipe(cfg: Any) -> Any:
    """`cfg` (a TrainConfig) with every recipe field that was left None filled in for `cfg.linear`: its per-model
    value (`lr_bitnet`, ...) if given, else the recipe's."""
    filled = {}
    for name in RECIPE_FIELDS:
        own = getattr(cfg, f"{name}_{cfg.linear}", None) if name in PER_MODEL_FIELDS else None
        if own is not None:
            filled[name] = own
        elif getattr(cfg, name) is None:
            filled[name] = RECIPES[cfg.linear][name]
    return replace(cfg, **filled) if filled else cfg


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)  # 0 -> 1 after warmup
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    # BitNet b1.58 two-stage: high lr decaying linearly to half peak, then a drop and linear decay to min.
    return 1 - 0.5 * t / 0.5 if t < 0.5 else 0.3 + (min_ratio - 0.3) * (t - 0.5) / 0.5


def weight_decay_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The two-stage recipe turns weight decay off for the second half; cosine keeps it constant."""
    return 0.0 if schedule == "two_stage" and step >= warmup + (total - warmup) / 2 else 1.0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers only; norms, embeddings (and the head tied to them), biases: no decay."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, rest = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in no_decay else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
