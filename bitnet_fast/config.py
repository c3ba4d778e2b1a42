"""`TrainConfig`: every setting of a training run, its default and its allowed range, in one dataclass.

The CLI derives `bitnet-fast train`'s options from these fields (cli.config_options), checkpoints store them
(dataclasses.asdict) and a resume compares them (resume.py). Fields left None (lr, schedule, warmup) take the trained
model's recipe (recipe.RECIPES) in `train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .data import TOKENIZERS
from .distributed import COMPRESSIONS
from .model import LINEARS, PRESETS
from .nn import GRAD_INPUTS
from .recipe import RECIPES, SCHEDULES

DEVICES = ("cpu", "cuda")


def option(default: Any, help: str | None = None, **rules: Any) -> Any:
    """A TrainConfig field. With `help` it is an option of `bitnet-fast train`: the CLI derives the flag's name, type,
    default and range from the field (a bool that defaults to True becomes --no-NAME, and `help` describes that
    flag). `rules` are checked by TrainConfig itself: min (with min_open: strictly above), max, choices; every
    float must be finite; path="dir" tells the CLI the value is a folder."""
    return field(default=default, metadata={"help": help, **rules})


def _recipe(name: str) -> str:
    """The recipes' values of a field, for a help text: "bitnet 0.004, fp 0.002"."""
    return ", ".join(f"{m} {r[name]}" for m, r in RECIPES.items())


@dataclass
class TrainConfig:
    """Everything one training run depends on; the single home of every training default."""

    preset: str = option("small", "Model size preset.", choices=tuple(sorted(PRESETS)))
    linear: str = option("bitnet", choices=LINEARS)  # the CLI's --model (bitnet, fp, or both through train_pair)
    out: str | None = None  # run folder; None: runs/PRESET (train_pair puts its two runs in OUT/bitnet and OUT/fp)
    epochs: int = option(3, "Passes over the training split.", min=1)
    max_steps: int | None = option(None, "Stop after N optimizer steps.", min=1)  # the schedule is planned for N
    batch_size: int = option(32, "Sequences per micro-batch.", min=1)
    seq_len: int = option(128, "Tokens per sequence.", min=2)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", min=1)
    # lr, schedule, warmup_frac: None takes the trained model's recipe (recipe.RECIPES), see recipe.with_recipe
    lr: float | None = option(None, f"Peak learning rate [default: {_recipe('lr')}].", min=0, min_open=True)
    lr_bitnet: float | None = option(None, "Peak learning rate of the BitNet model (--model both).", min=0,
                                     min_open=True)
    lr_fp: float | None = option(None, "Peak learning rate of the fp model (--model both).", min=0, min_open=True)
    min_lr_ratio: float = 0.1
    warmup_frac: float | None = option(None, f"Fraction of the steps spent in linear lr warmup [default: "
                                       f"{_recipe('warmup_frac')}].", min=0, max=1)
    schedule: str | None = option(None, f"Learning-rate schedule after warmup [default: {_recipe('schedule')}].",
                                  choices=SCHEDULES)
    schedule_bitnet: str | None = option(None, "Schedule of the BitNet model (--model both).", choices=SCHEDULES)
    schedule_fp: str | None = option(None, "Schedule of the fp model (--model both).", choices=SCHEDULES)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = option(0, "Random seed (initialization and data order).", min=0, max=2**32 - 1)
    device: str = option("cpu", "Device to train on.", choices=DEVICES)
    data_dir: str | None = option(None, "WikiText-2 folder (default: $BITNET_FAST_DATA, else downloaded into the "
                                  "cache dir).", path="dir")
    data: str | None = option(None, "Train on a folder written by `bitnet-fast prepare` (its train and valid splits "
                              "and tokenizer) instead of WikiText-2.", path="dir")
    offline: bool = option(False, "Never download WikiText-2 (as HF_HUB_OFFLINE=1); fail when it is not found.")
    tokenizer: str = option("bpe", "Tokenizer trained on the train split.", choices=TOKENIZERS)
    vocab_size: int = option(8192, "Tokenizer vocabulary size.", min=16)
    max_lines: int | None = option(None, "Use only the first N lines per split.", min=1)
    eval_batch_size: int = option(16, min=1)
    ckpt_every: int = option(200, "Optimizer steps between checkpoints (one is also written at each epoch end).",
                             min=1)
    keep_last: int = option(2, "Checkpoints kept.", min=1)
    log_every: int = option(10, "Optimizer steps between step events in OUT/metrics.jsonl.", min=1)
    resume: bool = option(False, "Continue the run in --out from its newest valid checkpoint, with its settings.")
    overwrite: bool = option(False, "Start a new run in --out, deleting the checkpoints of the run there.")
    grad_input: str = option("exact", "BitLinear's input gradient: exact (fp32 dY @ W), or int8 (dY quantized per row, "
                             "times the ternary W on the int8 kernels; faster, see docs/training.md).",
                             choices=GRAD_INPUTS)
    distributed: bool = option(False, "Use torch.distributed (DDP) when launched by torchrun.")
    grad_compression: str = option("none", "All-reduce gradients as int8 with error feedback (--distributed).",
                                   choices=COMPRESSIONS)
    sync_every: int = option(1, "Local SGD: average the ranks' weights every N steps instead of all-reducing "
                             "gradients every step (--distributed).", min=1)
    progress: bool = option(True, "No tqdm bar (logs still go to metrics.jsonl).")
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields that replace the preset's

    def __post_init__(self) -> None:
        for f in fields(self):
            value, rules = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if "choices" in rules and value not in rules["choices"]:
                raise ValueError(f"{f.name}={value!r}; use one of {rules['choices']}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
            if "min" in rules and (value <= rules["min"] if rules.get("min_open") else value < rules["min"]):
                raise ValueError(f"{f.name} must be {'>' if rules.get('min_open') else '>='} {rules['min']}, "
                                 f"got {value}")
            if "max" in rules and value > rules["max"]:
                raise ValueError(f"{f.name} must be <= {rules['max']}, got {value}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: --resume continues the run in --out, "
                             "--overwrite deletes it")
        if self.data is not None and self.data_dir is not None:
            raise ValueError("data and data_dir both given: --data trains on a prepared folder, --data-dir names the "
                             "WikiText-2 folder; use one")
        if self.out is None:
            self.out = f"runs/{self.preset}"
