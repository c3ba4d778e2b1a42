"""Recipe sweep points for issue 15: train `small` for a short budget (default a quarter epoch) with the point's
settings, evaluate the whole valid split, and append one JSON line per point to --results.

    python tools/recipe_sweep.py b_w25:linear=bitnet,lr=2e-3,schedule=two_stage,warmup_frac=0.25
    python tools/recipe_sweep.py f_subln:linear=fp,lr=2e-3,schedule=cosine,subln=1,seed=1 --steps 160

A point is NAME:key=value,... with keys linear (bitnet|fp), lr, schedule (cosine|two_stage), warmup_frac,
subln (0|1) and seed; schedule and warmup_frac left out take the model's recipe, subln and seed default to 0.
Points run one after another in this process (run several processes for parallel points; docs/training.md
"The recipe sweep" has the table this wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bitnet_fast.config import TrainConfig
from bitnet_fast.train import train

KEYS = {"linear": str, "lr": float, "schedule": str, "warmup_frac": float, "subln": int, "seed": int}


def parse_point(arg: str) -> tuple[str, dict]:
    """'NAME:k=v,...' -> (NAME, {k: typed v}); a missing linear/lr or an unknown key is an error naming it."""
    name, _, spec = arg.partition(":")
    usage = f"point {arg!r}: want NAME:linear=...,lr=...[,schedule,warmup_frac,subln,seed]"
    try:
        fields = dict(part.split("=", 1) for part in spec.split(",") if part)
        unknown = set(fields) - set(KEYS)
        typed = {k: KEYS[k](v) for k, v in fields.items() if k in KEYS}
    except ValueError as e:  # a part without '=', or a value of the wrong type
        raise SystemExit(f"{usage}; {e}") from None
    if not name or unknown or not {"linear", "lr"} <= set(fields):
        raise SystemExit(usage + (f"; unknown {sorted(unknown)}" if unknown else ""))
    return name, typed


def run_point(name: str, point: dict, args: argparse.Namespace) -> dict:
    """Train one point and return its row (settings, valid ppl token and word level, the mean train loss of the
    steps run, tokens/s, wall time)."""
    cfg = TrainConfig(preset="small", linear=point["linear"], max_steps=args.steps, lr=point["lr"],
                      schedule=point.get("schedule"), warmup_frac=point.get("warmup_frac"),
                      seed=point.get("seed", 0), data_dir=args.data_dir, out=str(Path(args.out) / name),
                      overwrite=True, progress=False, model_overrides={"subln": bool(point.get("subln", 0))})
    t0 = time.time()
    r = train(cfg)
    return {"name": name, **point, "steps": r["steps"], "valid_ppl": r["final_valid_ppl"],
            "valid_word_ppl": r["final_valid_word_ppl"], "train_loss": r["epochs"][-1]["train_loss"],
            "tok_s": r["mean_tokens_per_sec"], "wall_s": time.time() - t0, "threads": r["threads"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("points", nargs="+", help="NAME:linear=bitnet,lr=2e-3,...")
    ap.add_argument("--steps", type=int, default=160, help="optimizer steps (160 ~ a quarter epoch of small)")
    ap.add_argument("--data-dir", default=os.environ.get("BITNET_FAST_DATA"), help="WikiText-2 folder")
    ap.add_argument("--out", default="runs/sweep", help="one run folder per point under this")
    ap.add_argument("--results", default="runs/sweep/results.jsonl", help="JSON lines appended here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    points = [parse_point(p) for p in args.points]  # all checked before the first one trains
    torch.set_num_threads(args.threads)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    for name, point in points:
        row = run_point(name, point, args)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
