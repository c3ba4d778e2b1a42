"""The training loop: epochs over WikiText-2 (or a prepared corpus), AdamW, warmup + cosine or BitNet two-stage
schedule, clipping, accumulation, atomic checkpoints with exact resume, Ctrl-C and NaN handling, DDP form.

`train(cfg)` is what the CLI, tests and benchmarks call. Under torchrun (WORLD_SIZE set) with
`cfg.distributed`, it wraps the model in DistributedDataParallel (gloo on CPU, nccl on CUDA); rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    remove_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .data import Batches, wikitext
from .evaluate import perplexity
from .model import build_model, count_parameters, preset_config
from .plumbing import UserError, peak_rss_bytes, write_json

SCHEDULES = ("cosine", "two_stage")


class TrainingError(UserError):
    """Training cannot go on (non-finite loss, a checkpoint of another model); the message says what to do."""


@dataclass
class TrainConfig:
    preset: str = "small"
    linear: str = "bitnet"  # "bitnet" | "fp"
    out: str = "runs/small"
    epochs: int = 1
    max_steps: int | None = None  # cap on optimizer steps (the schedule is planned for this many)
    batch_size: int = 32
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    schedule: str = "cosine"  # "cosine" | "two_stage"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None
    tokenizer: str = "bpe"  # "bpe" | "word"
    vocab_size: int = 8192
    max_lines: int | None = None  # use only the first lines of each split (tests, quick runs)
    eval_batch_size: int = 16
    ckpt_every: int = 200  # optimizer steps between checkpoints (plus one at each epoch end)
    keep_last: int = 2
    log_every: int = 10
    resume: bool = False
    distributed: bool = False
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; use one of {SCHEDULES}")
        for name in ("epochs", "batch_size", "seq_len", "grad_accum", "keep_last", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


# ------------------------------------------------------------------------------------------------ schedule
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


# ------------------------------------------------------------------------------------------------ helpers
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class _StopFlag:
    """First Ctrl-C asks the loop to checkpoint and stop at the next step boundary; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def _init_distributed(cfg: TrainConfig) -> tuple[int, int]:
    if not cfg.distributed:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} (torchrun) but distributed "
                             "is off; add --distributed so the ranks share one run")
        return 0, 1
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, on_step=None) -> dict:
    """Train one model as configured; returns (and writes to cfg.out/report.json) the report.

    `on_step(step, loss)` is called after every optimizer step (progress hooks, tests).
    """
    rank, world = _init_distributed(cfg)
    out = Path(cfg.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    corpus = wikitext(cfg.data_dir, cfg.tokenizer, cfg.vocab_size, cfg.max_lines)
    mcfg = preset_config(cfg.preset, vocab_size=corpus.vocab_size, linear=cfg.linear, **cfg.model_overrides)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds preset {cfg.preset}'s max_seq_len {mcfg.max_seq_len}")
    model = build_model(mcfg, cfg.device)
    n_params = count_parameters(model)
    batches = Batches(corpus.splits["train"].tokens, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
    steps_per_epoch = len(batches) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"--grad-accum {cfg.grad_accum} exceeds the {len(batches)} batches per epoch")
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    warmup = max(1, int(cfg.warmup_frac * total))
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            fused=cfg.device.startswith("cuda") or None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.schedule, cfg.min_lr_ratio))
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model)

    valid = corpus.splits["valid"]
    report = {
        "model": cfg.linear, "preset": cfg.preset, "parameters": n_params, "config": mcfg.to_dict(),
        "train_config": asdict(cfg), "git_commit": _git_commit(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "world_size": world, "steps_per_epoch": steps_per_epoch,
        "tokenizer": {"kind": cfg.tokenizer, "vocab_size": corpus.vocab_size,
                      "train_tokens": len(corpus.splits["train"].tokens), "valid_tokens": len(valid.tokens),
                      "valid_words": valid.words},
        "epochs": [],
    }
    if cfg.linear == "bitnet":
        from .kernels import backend_for

        report["kernel_backend"] = backend_for(cfg.device)
    pos, acc = {"step": 0, "epoch": 0, "batch": 0}, {"loss": 0.0, "n": 0, "tokens": 0, "seconds": 0.0}
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if rank == 0:
        print(f"[{cfg.linear}] preset {cfg.preset}: {n_params:,} parameters, {steps_per_epoch} steps/epoch x "
              f"{cfg.epochs} epochs ({total} steps), {cfg.batch_size * cfg.seq_len * cfg.grad_accum * world} "
              f"tokens/step" + (f", resuming at step {ckpt['step']}" if ckpt else ""), flush=True)
    if ckpt is not None:
        if ckpt["model_config"] != mcfg.to_dict():
            raise TrainingError(f"checkpoint in {out} is for another model ({ckpt['model_config']}); use a new --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        pos, acc, report = ckpt["pos"], ckpt["acc"], ckpt["report"]
        set_rng_state(ckpt["rng"])
    elif rank == 0:
        remove_checkpoints(out)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        init = perplexity(model, valid, cfg.seq_len, cfg.eval_batch_size, cfg.device)
        report.update(initial_valid_loss=init["loss"], initial_valid_ppl=init["ppl"],
                      initial_valid_word_ppl=init["word_ppl"])
    log = open(out / "metrics.jsonl", "a") if rank == 0 else None

    def checkpoint() -> None:
        if rank != 0:
            return
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "model_config": mcfg.to_dict(), "train_config": asdict(cfg), "tokenizer": corpus.tokenizer.to_str(),
                 "step": pos["step"], "pos": pos, "acc": acc, "report": report, "rng": rng_state()}
        save_checkpoint(out, state, cfg.keep_last)

    stop = _StopFlag()
    prev_handler = signal.signal(signal.SIGINT, stop) if rank == 0 else None
    try:
        while pos["epoch"] < cfg.epochs and pos["step"] < total and not stop.requested:
            epoch = pos["epoch"]
            if _run_epoch(cfg, ddp, opt, sched, batches, total, warmup, pos, acc, stop, log, checkpoint, on_step):
                checkpoint()
                break
            if rank == 0:
                ev = perplexity(model, valid, cfg.seq_len, cfg.eval_batch_size, cfg.device)
                row = {"epoch": epoch + 1, "train_loss": acc["loss"] / max(1, acc["n"]), "valid_loss": ev["loss"],
                       "valid_ppl": ev["ppl"], "valid_word_ppl": ev["word_ppl"],
                       "tokens_per_sec": acc["tokens"] / max(acc["seconds"], 1e-9), "seconds": acc["seconds"],
                       "steps": pos["step"]}
                report["epochs"].append(row)
                log.write(json.dumps({"event": "epoch", **row}) + "\n")
                log.flush()
                print(f"[{cfg.linear}] epoch {epoch + 1}: train loss {row['train_loss']:.4f}, valid ppl "
                      f"{ev['ppl']:.2f} (word {ev['word_ppl']:.2f}), {row['tokens_per_sec']:.0f} tok/s, "
                      f"{row['seconds']:.0f} s", flush=True)
            pos.update(epoch=epoch + 1, batch=0)
            acc.update(loss=0.0, n=0, tokens=0, seconds=0.0)
            checkpoint()
    finally:
        if prev_handler is not None:
            signal.signal(signal.SIGINT, prev_handler)
        if log is not None:
            log.close()
    report["interrupted"] = stop.requested
    report["steps"] = pos["step"]
    if report["epochs"]:
        report["final_valid_ppl"] = report["epochs"][-1]["valid_ppl"]
        report["final_valid_word_ppl"] = report["epochs"][-1]["valid_word_ppl"]
        report["total_seconds"] = sum(e["seconds"] for e in report["epochs"])
        report["mean_tokens_per_sec"] = sum(e["tokens_per_sec"] for e in report["epochs"]) / len(report["epochs"])
    report["peak_rss_bytes"] = peak_rss_bytes()
    if rank == 0:
        write_json(out / "report.json", report)
    return report


def _run_epoch(cfg, ddp, opt, sched, batches, total, warmup, pos, acc, stop, log, checkpoint, on_step) -> bool:
    """Optimizer steps over epoch pos["epoch"] from pos["batch"], updating pos/acc in place; True if Ctrl-C."""
    from contextlib import nullcontext

    from tqdm import tqdm

    n_batches = (len(batches) // cfg.grad_accum) * cfg.grad_accum
    epoch = pos["epoch"]
    it = batches.epoch(epoch, start=pos["batch"])
    done = pos["batch"] // cfg.grad_accum
    bar = tqdm(total=min(n_batches // cfg.grad_accum, done + total - pos["step"]), initial=done,
               desc=f"{cfg.linear} epoch {epoch + 1}", disable=not cfg.progress, mininterval=2, dynamic_ncols=True)
    try:
        while pos["batch"] < n_batches and pos["step"] < total:
            t0 = time.perf_counter()
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                x, y = next(it)
                sync = micro == cfg.grad_accum - 1 or not hasattr(ddp, "no_sync")
                with nullcontext() if sync else ddp.no_sync():
                    _, loss = ddp(x.to(cfg.device), y.to(cfg.device))
                    if not torch.isfinite(loss):
                        ckpts = list_checkpoints(cfg.out)
                        raise TrainingError(
                            f"loss is {loss.item()} at step {pos['step']} (epoch {pos['epoch'] + 1}); stopped. "
                            f"Last good checkpoint: {ckpts[-1] if ckpts else 'none'}. "
                            "Lower --lr or raise warmup, then --resume.")
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip)
            wd = weight_decay_factor(pos["step"], total, warmup, cfg.schedule) * cfg.weight_decay
            opt.param_groups[0]["weight_decay"] = wd
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            pos["step"] += 1
            pos["batch"] += cfg.grad_accum
            dt = time.perf_counter() - t0
            n_tok = cfg.batch_size * cfg.seq_len * cfg.grad_accum * batches.world
            acc["loss"] += step_loss
            acc["n"] += 1
            acc["tokens"] += n_tok
            acc["seconds"] += dt
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{n_tok / dt:.0f}", refresh=False)
            bar.update()
            if log is not None and pos["step"] % cfg.log_every == 0:
                log.write(json.dumps({"event": "step", "step": pos["step"], "epoch": epoch + 1, "loss": step_loss,
                                      "lr": sched.get_last_lr()[0], "tokens_per_sec": n_tok / dt}) + "\n")
                log.flush()
            if on_step is not None:
                on_step(pos["step"], step_loss)
            if stop.requested:
                return True
            if pos["step"] % cfg.ckpt_every == 0:
                checkpoint()
    finally:
        bar.close()
    return False
