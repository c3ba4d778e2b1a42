"""The training loop: epochs over WikiText-2 with AdamW, warmup + cosine or the BitNet two-stage schedule,
clipping, gradient accumulation, checkpoints with exact resume, Ctrl-C and NaN handling, and the DDP form.

`train(cfg)` trains one model; `train_pair(cfg)` trains BitNet and its full-precision twin side by side, one
optimizer step of each in turn. The CLI, tests and benchmarks call these. `_train` reads top to bottom, as nanoGPT's
train.py does: set up, restore the `TrainState` from the newest checkpoint (or evaluate the untrained model), then
one loop of optimizer steps with interval-gated blocks for the end of an epoch, logging and checkpointing; it is a
generator that yields after every step, which is what lets `train_pair` interleave two runs. Under torchrun
(WORLD_SIZE set) with `cfg.distributed` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA);
the ranks share each evaluation and rank 0 writes.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Collection, Generator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import list_checkpoints, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .corpus import load_corpus, same_tokenizer
from .data import Batches, wikitext
from .distributed import (
    Comm,
    StopSignals,
    check_same,
    global_batch,
    init_process_group,
    rank0_first,
)
from .download import find_or_fetch
from .model import LINEARS, build_model, count_parameters, preset_config
from .nn import set_grad_input
from .plumbing import UserError, folder_lock, git_commit, machine_info, peak_rss_bytes, write_json
from .recipe import lr_factor, param_groups, weight_decay_factor, with_recipe
from .resume import open_run

SUMMARY_KEYS = ("parameters", "initial_valid_ppl", "final_valid_ppl", "final_valid_word_ppl", "final_test_ppl",
                "final_test_word_ppl", "mean_tokens_per_sec", "total_seconds", "peak_rss_bytes")


class TrainingError(UserError):
    """Training cannot go on (non-finite loss, a checkpoint of another model); the message says what to do."""


@dataclass
class TrainState:
    """Where a run stands and what it has measured so far: what a checkpoint stores (as a dict of plain types)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch in progress, 0-based
    batch: int = 0  # micro-batches of this epoch consumed
    loss_sum: float = 0.0  # this epoch so far: summed step losses, steps, tokens and seconds of training
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    initial_eval: dict | None = None  # perplexity() of the untrained model on the valid split
    epochs: list[dict] = field(default_factory=list)  # one row per finished epoch

    def epoch_done(self, n_batches: int, total: int) -> bool:
        """The epoch in progress has used up its `n_batches` micro-batches, or the `total` step budget ran out in it."""
        return self.batch >= n_batches or (self.step >= total and self.batch > 0)

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.loss_sum, self.steps, self.tokens, self.seconds = self.epoch + 1, 0, 0.0, 0, 0, 0.0

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> TrainState:
        if "state" in ckpt:
            return cls(**ckpt["state"])
        # Checkpoints written before TrainState kept the position, the statistics and the report in three dicts.
        pos, acc, rep = ckpt["pos"], ckpt["acc"], ckpt["report"]
        keys = ("loss", "ppl", "word_ppl")
        init = {k: rep[f"initial_valid_{k}"] for k in keys} if "initial_valid_ppl" in rep else None
        return cls(pos["step"], pos["epoch"], pos["batch"], acc["loss"], acc["n"], acc["tokens"], acc["seconds"],
                   init, rep["epochs"])


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None,
          explicit: Collection[str] | None = None) -> dict:
    """Train one model as configured; returns the report (rank 0 also writes it to cfg.out/report.json).

    Rank 0 holds cfg.out's lock for the whole run. With cfg.resume the run continues from its newest valid
    checkpoint with the checkpoint's settings and tokenizer; `explicit` names the fields the caller set on
    purpose (the CLI: the flags given), which must not conflict with them (resume.py; None: all fields).
    `on_step(step, loss)` is called after every optimizer step (progress hooks, tests).
    """
    run = _run(cfg, on_step, explicit)
    while (report := _advance(run)) is None:
        pass
    return report


StepRun = Generator[None, None, dict]  # a training run: yields after each optimizer step, returns its report


def _advance(run: StepRun) -> dict | None:
    """Take one optimizer step of `run`: None while it goes on, its report once it has finished."""
    try:
        next(run)
    except StopIteration as done:
        return done.value
    return None


def _run(cfg: TrainConfig, on_step: Callable[[int, float], None] | None, explicit: Collection[str] | None,
         stop: StopSignals | None = None, bar_position: int = 0) -> StepRun:
    """`train` as a generator. `stop`: a stop flag shared with other runs (installed by the caller; default: this
    run installs its own); `bar_position`: the line of its progress bar."""
    cfg = with_recipe(cfg)
    rank, world = init_process_group(cfg.distributed, cfg.device)
    with folder_lock(cfg.out, "training run") if rank == 0 else nullcontext():
        return (yield from _train(cfg, rank, world, on_step, explicit, stop, bar_position))


def _train(cfg: TrainConfig, rank: int, world: int, on_step: Callable[[int, float], None] | None,
           explicit: Collection[str] | None, shared_stop: StopSignals | None, bar_position: int) -> StepRun:
    # ---- set up: the run folder (fresh, resumed or refused), data, model, optimizer and schedule
    opening = open_run(cfg, rank, explicit)
    cfg, ckpt = opening.cfg, opening.ckpt
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    def get_corpus():  # rank 0 alone downloads WikiText-2 when it is missing; a resumed run brings its tokenizer
        if cfg.data is not None:
            return load_corpus(cfg.data)
        root = find_or_fetch(cfg.data_dir, offline=cfg.offline or rank > 0)
        splits = ("train", "valid", "test") if (root / "test.txt").is_file() else ("train", "valid")  # test: optional
        return wikitext(root, cfg.tokenizer, cfg.vocab_size, cfg.max_lines, splits,
                        tokenizer_json=ckpt["tokenizer"] if ckpt else None)

    corpus = rank0_first(get_corpus, rank, world)  # rank 0 fetches and tokenizes, then the others read its cache
    check_same(corpus.tokenizer.to_str(), "tokenizer", world)
    if ckpt is not None and not same_tokenizer(corpus.tokenizer, type(corpus.tokenizer).from_str(ckpt["tokenizer"])):
        raise TrainingError(f"--data {cfg.data} was tokenized with another tokenizer than the run in {out} was "
                            "trained with; resume on the folder it was trained on")
    valid = corpus.splits["valid"]
    mcfg = preset_config(cfg.preset, vocab_size=corpus.vocab_size, linear=cfg.linear, **cfg.model_overrides)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds preset {cfg.preset}'s max_seq_len {mcfg.max_seq_len}")
    model = set_grad_input(build_model(mcfg, cfg.device), cfg.grad_input)
    batches = Batches(corpus.splits["train"].tokens, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
    steps_per_epoch = len(batches) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"--grad-accum {cfg.grad_accum} exceeds the {len(batches)} batches per epoch")
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    warmup = max(1, int(cfg.warmup_frac * total))
    gbatch = global_batch(cfg.batch_size, cfg.grad_accum, world, cfg.seq_len)
    tokens_per_step = gbatch["tokens"]
    comm = Comm(model, rank, world, cfg.grad_compression, cfg.sync_every, start_local_step=warmup)
    ddp = comm.module
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            fused=cfg.device.startswith("cuda") or None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.schedule, cfg.min_lr_ratio))
    report = {
        "model": cfg.linear, "preset": cfg.preset, "parameters": count_parameters(model), "config": mcfg.to_dict(),
        "train_config": asdict(cfg), "run_id": opening.run_id, "git_commit": git_commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": machine_info(), "world_size": world, "global_batch": gbatch,
        "steps_per_epoch": steps_per_epoch,
        "data": str(corpus.dir) if cfg.data is not None else "wikitext-2",
        "tokenizer": {"kind": cfg.tokenizer if cfg.data is None else "prepared", "vocab_size": corpus.vocab_size,
                      "train_tokens": len(corpus.splits["train"].tokens), "valid_tokens": len(valid.tokens),
                      "valid_words": valid.words},
    }
    if cfg.linear == "bitnet":
        from .kernels import backend_for

        report["kernel_backend"] = backend_for(cfg.device)

    # ---- state: resume from the checkpoint open_run chose, or start fresh and evaluate the untrained model
    state = TrainState()
    if rank == 0:
        print(f"[{cfg.linear}] preset {cfg.preset}: {report['parameters']:,} parameters, {steps_per_epoch} steps/epoch"
              f" x {cfg.epochs} epochs ({total} steps), global batch {cfg.batch_size} x {cfg.grad_accum} accum x "
              f"{world} ranks = {gbatch['sequences']} sequences = {tokens_per_step} tokens/step"
              + (f", resuming at step {ckpt['step']}" if ckpt else ""), flush=True)
    if ckpt is not None:
        if ckpt["model_config"] != mcfg.to_dict():
            raise TrainingError(f"checkpoint in {out} is for another model ({ckpt['model_config']}); use a new --out")
        comm.load_state(ckpt, gbatch)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        state = TrainState.from_checkpoint(ckpt)
    else:
        if rank == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        state.initial_eval = comm.perplexity(model, valid, cfg.seq_len, cfg.eval_batch_size, cfg.device)

    # ---- the loop: one optimizer step per iteration
    n_batches = steps_per_epoch * cfg.grad_accum  # micro-batches per epoch; a tail too short for a step is skipped
    tokenizer = ckpt["tokenizer"] if ckpt else corpus.tokenizer.to_str()
    log = open(out / "metrics.jsonl", "a") if rank == 0 else None
    if log is not None and ckpt is not None:  # what this resume changed (RESUME_SAFE settings only)
        log.write(json.dumps({"event": "resume", "step": state.step, "changed": opening.changed}) + "\n")
    saved = {"run_id": opening.run_id, "tokenizer": tokenizer, "known": {}}
    bar = tqdm(total=total, initial=state.step, desc=cfg.linear, disable=not cfg.progress or rank != 0, mininterval=2,
               dynamic_ncols=True, position=bar_position)
    data = None
    stop = shared_stop or StopSignals().install()
    try:
        while not stop.requested:
            # -- end of an epoch (its batches used up, or the step budget): evaluate, log, begin the next one
            if state.epoch_done(n_batches, total):
                ev = comm.perplexity(model, valid, cfg.seq_len, cfg.eval_batch_size, cfg.device)  # every rank
                if rank == 0:
                    row = {"epoch": state.epoch + 1, "train_loss": state.loss_sum / max(1, state.steps),
                           "valid_loss": ev["loss"], "valid_ppl": ev["ppl"], "valid_word_ppl": ev["word_ppl"],
                           "tokens_per_sec": state.tokens / max(state.seconds, 1e-9), "seconds": state.seconds,
                           "steps": state.step}
                    state.epochs.append(row)
                    log.write(json.dumps({"event": "epoch", **row}) + "\n")
                    log.flush()
                    tqdm.write(f"[{cfg.linear}] epoch {row['epoch']}: train loss {row['train_loss']:.4f}, valid ppl "
                               f"{ev['ppl']:.2f} (word {ev['word_ppl']:.2f}), {row['tokens_per_sec']:.0f} tok/s, "
                               f"{row['seconds']:.0f} s")
                    sys.stdout.flush()
                state.next_epoch()
                data = None
                _save(cfg, model, opt, sched, state, saved, comm.state_dict(gbatch), rank)
            if state.epoch >= cfg.epochs or state.step >= total:
                break
            if data is None:
                data = batches.epoch(state.epoch, start=state.batch)

            # -- one optimizer step over grad_accum micro-batches
            t0 = time.perf_counter()
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                x, y = next(data)
                sync = micro == cfg.grad_accum - 1 or world == 1
                with nullcontext() if sync else ddp.no_sync():
                    _, loss = ddp(x.to(cfg.device), y.to(cfg.device))
                    if not torch.isfinite(loss):
                        ckpts = list_checkpoints(out)
                        raise TrainingError(
                            f"loss is {loss.item()} at step {state.step} (epoch {state.epoch + 1}); stopped. "
                            f"Last good checkpoint: {ckpts[-1] if ckpts else 'none'}. Train again with a lower "
                            "--lr (into another --out, or with --overwrite); --resume keeps the run's lr.")
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip)
            opt.param_groups[0]["weight_decay"] = (
                weight_decay_factor(state.step, total, warmup, cfg.schedule) * cfg.weight_decay)
            opt.step()
            comm.after_optimizer_step(model.parameters())
            sched.step()
            opt.zero_grad(set_to_none=True)
            step_loss, stop.requested = comm.step_end(step_loss, stop.requested)  # every rank stops at one step
            dt = time.perf_counter() - t0
            state.step += 1
            state.batch += cfg.grad_accum
            state.loss_sum += step_loss
            state.steps += 1
            state.tokens += tokens_per_step
            state.seconds += dt
            bar.set_postfix(epoch=state.epoch + 1, loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}",
                            refresh=False)
            bar.update()
            if on_step is not None:
                on_step(state.step, step_loss)
            yield

            # -- log every log_every steps; checkpoint every ckpt_every steps (an epoch's end has its own) and on Ctrl-C
            if log is not None and state.step % cfg.log_every == 0:
                log.write(json.dumps({"event": "step", "step": state.step, "epoch": state.epoch + 1, "loss": step_loss,
                                      "lr": sched.get_last_lr()[0], "tokens_per_sec": tokens_per_step / dt,
                                      **comm.log_fields()}) + "\n")
                log.flush()
            interval = state.step % cfg.ckpt_every == 0 and not state.epoch_done(n_batches, total)
            if stop.requested or interval:
                _save(cfg, model, opt, sched, state, saved, comm.state_dict(gbatch), rank)
    finally:
        bar.close()
        if shared_stop is None:
            stop.restore()
        if log is not None:
            log.close()

    # ---- report
    report.update(interrupted=stop.requested, stop_signal=stop.name, steps=state.step, epochs=state.epochs,
                  peak_rss_bytes=peak_rss_bytes(), comm=comm.report())
    if state.initial_eval is not None:
        report.update({f"initial_valid_{k}": state.initial_eval[k] for k in ("loss", "ppl", "word_ppl")})
    test = corpus.splits.get("test")
    if test is not None and not stop.requested:  # the held-out test split, once, after training (every rank)
        ev = comm.perplexity(model, test, cfg.seq_len, cfg.eval_batch_size, cfg.device)
        report.update(final_test_loss=ev["loss"], final_test_ppl=ev["ppl"], final_test_word_ppl=ev["word_ppl"])
    if state.epochs:
        report.update(final_valid_ppl=state.epochs[-1]["valid_ppl"],
                      final_valid_word_ppl=state.epochs[-1]["valid_word_ppl"],
                      total_seconds=sum(e["seconds"] for e in state.epochs),
                      mean_tokens_per_sec=sum(e["tokens_per_sec"] for e in state.epochs) / len(state.epochs))
    if rank == 0:
        write_json(out / "report.json", report)
    return report


def _save(cfg: TrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, state: TrainState,
          saved: dict, ranks: dict, rank: int) -> None:
    """Checkpoint everything an exact resume needs (see checkpoint.py for the layout); only rank 0 writes.
    `saved` holds the run's id, tokenizer JSON and the pruning cache; `ranks` is `Comm.state_dict()`: the part
    that differs between ranks (error-feedback residuals)."""
    if rank != 0:
        return
    save_checkpoint(cfg.out, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "model_config": model.config.to_dict(), "train_config": asdict(cfg), "tokenizer": saved["tokenizer"],
        "state": asdict(state), "rng": rng_state(), "step": state.step, "distributed": ranks,
        "run_id": saved["run_id"]}, cfg.keep_last, saved["known"])


# ------------------------------------------------------------------------------------------------ side by side
def train_pair(cfg: TrainConfig, explicit: Collection[str] | None = None,
               on_step: Callable[[str, int, float], None] | None = None) -> dict[str, dict]:
    """Train BitNet and its fp twin with the same config in cfg.out/bitnet and cfg.out/fp, one optimizer step of
    each in turn, and write cfg.out/summary.json. Returns {linear: report}.

    Interleaved rather than one after the other so that the two tokens/s figures are measured under the same
    machine conditions (a shared host's speed drifts by up to 2x over minutes, which made sequential pairs
    unreadable), and both runs make progress together. Each run draws from its own random state (swapped in
    around its steps), so it trains exactly as it would alone. Ctrl-C stops both at their next step, each with a
    checkpoint and no summary, so that `--resume` continues both. `on_step(linear, step, loss)` follows every
    step."""
    out, stop = Path(cfg.out), StopSignals().install()
    runs: dict[str, StepRun] = {
        linear: _run(replace(cfg, linear=linear, out=str(out / linear)), explicit=explicit, stop=stop, bar_position=i,
                     on_step=None if on_step is None else (lambda step, loss, m=linear: on_step(m, step, loss)))
        for i, linear in enumerate(LINEARS)}
    rng = {linear: rng_state() for linear in runs}
    reports: dict[str, dict] = {}
    try:
        while len(reports) < len(runs):
            for linear, run in runs.items():
                if linear in reports:
                    continue
                set_rng_state(rng[linear])
                if (report := _advance(run)) is not None:
                    reports[linear] = report
                rng[linear] = rng_state()
    finally:
        for run in runs.values():
            run.close()  # after an error in one run: the other's progress bar, log and folder lock are released
        stop.restore()
    reports = {linear: reports[linear] for linear in runs}
    if not any(r["interrupted"] for r in reports.values()):
        write_json(out / "summary.json", {m: {k: r.get(k) for k in SUMMARY_KEYS} for m, r in reports.items()})
    return reports


def side_by_side(reports: dict[str, dict]) -> str:
    """The text table the CLI prints after `train_pair`: one column per model."""
    rows = [("", *reports), ("parameters", *(f"{r['parameters']:,}" for r in reports.values()))]
    for key, label in (("initial_valid_ppl", "valid ppl before"), ("final_valid_ppl", "valid ppl after"),
                       ("final_valid_word_ppl", "valid word ppl after"), ("final_test_ppl", "test ppl after"),
                       ("final_test_word_ppl", "test word ppl after"), ("mean_tokens_per_sec", "train tokens/s"),
                       ("total_seconds", "train seconds")):
        if any(r.get(key) is not None for r in reports.values()):  # (test rows only when the data has a test split)
            rows.append((label, *(f"{r[key]:.2f}" if r.get(key) is not None else "-" for r in reports.values())))
    speeds = [r.get("mean_tokens_per_sec") for r in reports.values()]
    if len(speeds) == 2 and all(speeds):
        rows.append((f"tokens/s {' / '.join(reports)}", f"{speeds[0] / speeds[1]:.3f}x", ""))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  " + "  ".join(f"{c:>12}" for c in r[1:]) for r in rows)
