"""Multi-rank training on torch.distributed: process-group setup, the DDP wrapper with its communication hooks,
the per-step agreement between ranks, stop signals, and the part of a checkpoint that belongs to the ranks.

The training loop (train.py) calls into one `Comm` object and stays the same at every world size:

* `init_process_group()` joins the process group torchrun describes (gloo on CPU, nccl on CUDA): (rank, world);
  `rank0_first` prepares the corpus on rank 0 before the others read it, `check_same` proves they agree.
* `Comm(model, ...)` wraps the model in DistributedDataParallel and registers at most one communication hook:
  `--grad-compression int8` (`int8_ef_hook`: int8 payload, one scale and one error-feedback residual per tensor) or
  `--sync-every H` (torch's post-local-SGD hook plus its `PeriodicModelAverager`: gradients stay local, parameters
  are averaged every H optimizer steps). The two together are refused.
* `Comm.step_end(loss, stop)` all-reduces the step loss (so rank 0 logs the global mean) together with the stop
  flags, so that every rank stops at the same step after a SIGINT/SIGTERM reaches any of them.
* `Comm.state_dict()` (a collective: every rank calls it) gathers the per-rank error-feedback residuals to rank 0,
  which writes them into the checkpoint; `Comm.load_state(ckpt)` gives each rank its own residual back, and refuses
  a resume at another global batch (a resume at another world size with the same global batch continues exactly
  where the data order stood: micro-batch b of all ranks together covers the same windows at every world size).
* `Comm.perplexity()` (a collective) evaluates with every rank taking a share of the windows: 1/world of the time,
  and no rank waits in a collective while another evaluates alone (gloo's 30-minute timeout ends such a wait).
* `StopSignals` turns the first SIGINT or SIGTERM (what torchrun, SLURM and Kubernetes send before a kill) into a
  request to finish the step, checkpoint and exit; a second one aborts.

torch.distributed's rendezvous and its collectives have no authentication: run it on a private network.

No `from __future__ import annotations` here: DDP checks that a hook's `bucket` annotation *is* dist.GradBucket.
"""

import hashlib
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .data import Split
from .evaluate import nll_sum, perplexity, ppl_from
from .plumbing import UserError

COMPRESSIONS = ("none", "int8")
T = TypeVar("T")


class DistributedError(UserError):
    """A distributed setting that cannot work (a resume at another global batch, refused combinations)."""


# ------------------------------------------------------------------------------------------------ process group
def init_process_group(distributed: bool, device: str) -> tuple[int, int]:
    """(rank, world size). With `distributed` and torchrun's WORLD_SIZE set, join the process group (gloo on CPU,
    nccl on CUDA); otherwise a single process (0, 1). torchrun without `distributed` is refused, as N copies of
    the same run writing into one folder would be."""
    if not distributed:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} (torchrun) but distributed "
                             "is off; add --distributed so the ranks share one run")
        return 0, 1
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=_store(),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size()


def _store() -> dist.Store:
    """torchrun's key-value store, with a prefix per restart attempt. torchrun keeps one store across
    `--max-restarts` attempts; without the prefix the new workers read the addresses of the killed ones and
    gloo waits forever to connect to them."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts)
    return dist.PrefixStore(f"bitnet-fast/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_main() -> bool:
    """Whether this process is the one that prints and writes: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank0_first(fn: Callable[[], T], rank: int, world: int) -> T:
    """`fn()` on rank 0 first, then on the other ranks: a cold cache (the tokenized corpus) is filled once and the
    others read it, instead of every rank tokenizing the corpus (and racing to write the same cache files)."""
    if world == 1:
        return fn()
    if rank == 0:
        out = fn()
        dist.barrier()
        return out
    dist.barrier()
    return fn()


def check_same(text: str, what: str, world: int) -> None:
    """Refuse to go on unless `text` (e.g. the tokenizer) is byte-identical on every rank: ranks on several machines
    each read their own cache, and a tokenizer trained separately on each would give the same text other ids."""
    if world == 1:
        return
    mine = torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if any(not torch.equal(e, every[0]) for e in every):
        raise DistributedError(f"the {what} differs between ranks (each machine prepared its own); put "
                               "BITNET_FAST_CACHE on storage all machines share, or copy rank 0's cache to the others")


def global_batch(batch_size: int, grad_accum: int, world: int, seq_len: int) -> dict[str, int]:
    """The batch one optimizer step sees across all ranks (what report.json records as `global_batch`)."""
    seqs = batch_size * grad_accum * world
    return {"batch_size": batch_size, "grad_accum": grad_accum, "world_size": world, "sequences": seqs,
            "tokens": seqs * seq_len}


# ------------------------------------------------------------------------------------------------ int8 + error feedback
class Int8ErrorFeedback:
    """State of `int8_ef_hook`: one fp32 residual per parameter (keyed by name, so it survives DDP rebuilding its
    buckets after the first step), and the payload bytes this rank handed to the collective."""

    def __init__(self, model: torch.nn.Module, world: int, group: Any = None) -> None:
        self.names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
        self.world, self.group = world, group
        self.residuals: dict[str, torch.Tensor] = {}
        self.payload_bytes = 0  # int8 payload + scale, summed over the buckets of all steps so far
        self.dense_bytes = 0  # what the fp32 all-reduce would have handed over for the same buckets

    def flat_residual(self) -> torch.Tensor:
        """All residuals in parameter order as one fp32 vector (zeros where none yet)."""
        return torch.cat([self.residuals.get(n, torch.zeros(s)).reshape(-1).float() for n, s in self.shapes.items()])

    def set_flat_residual(self, flat: torch.Tensor) -> None:
        """Inverse of `flat_residual`."""
        out, i = {}, 0
        for n, s in self.shapes.items():
            k = s.numel()
            out[n] = flat[i:i + k].reshape(s).clone()
            i += k
        if i != flat.numel():
            raise DistributedError(f"checkpoint residual has {flat.numel()} values, the model {i}; use a new --out")
        self.residuals = out


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale for the whole tensor: (q int8, scale fp32 0-d); x ~ q * scale."""
    scale = (x.abs().max().float() / 127).clamp_min(1e-30)
    return (x / scale).round_().clamp_(-127, 127).to(torch.int8), scale


def int8_ef_hook(state: Int8ErrorFeedback, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: add each tensor's residual to its gradient, quantize it to int8 with one scale per
    tensor, keep what the int8 value does not carry as the tensor's new residual, all-gather the int8 payloads
    (+ 4 bytes per tensor for its scale) and return the mean of the dequantized gradients of all ranks.

    ~4x fewer bytes than the fp32 all-reduce; what is not sent this step is sent in a later one (error feedback).
    Scales per tensor rather than per bucket make the result independent of how DDP groups tensors into buckets
    (it regroups them after the first step, and again after a restart), so a resumed run is bit-identical."""
    buf = bucket.buffer()  # flat fp32 gradient of this bucket; bucket.gradients() are consecutive views into it
    qs, scales, sizes = [], [], []
    for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
        name = state.names[id(p)]
        r = state.residuals.get(name)
        if r is not None:
            g.add_(r.view_as(g))
        q, scale = quantize_int8(g)
        state.residuals[name] = (g - q.float() * scale).detach()
        qs.append(q.reshape(-1))
        scales.append(scale)
        sizes.append(g.numel())
    payload = torch.cat([*qs, torch.stack(scales).view(torch.int8)])  # int8 values, then the fp32 scales' bytes
    state.payload_bytes += payload.numel()
    state.dense_bytes += buf.numel() * buf.element_size()
    n = sum(sizes)
    per_value = torch.tensor(sizes, device=buf.device)
    gathered = [torch.empty_like(payload) for _ in range(state.world)]
    fut = dist.all_gather(gathered, payload, group=state.group, async_op=True).get_future()

    def decode(_: Any) -> torch.Tensor:
        total = torch.zeros(n, dtype=torch.float32, device=buf.device)
        for p in gathered:  # rank order: the same sum, in the same order, on every rank
            total += p[:n].float() * p[n:].view(torch.float32).repeat_interleave(per_value)
        return buf.copy_(total / state.world)

    return fut.then(decode)


# ------------------------------------------------------------------------------------------------ the wrapper
class Comm:
    """What the training loop needs from torch.distributed (a no-op shell at world size 1)."""

    def __init__(self, model: torch.nn.Module, rank: int, world: int, grad_compression: str = "none",
                 sync_every: int = 1, start_local_step: int = 0) -> None:
        if grad_compression not in COMPRESSIONS:
            raise ValueError(f"grad_compression={grad_compression!r}; use one of {COMPRESSIONS}")
        if grad_compression != "none" and sync_every > 1:
            raise DistributedError("--grad-compression and --sync-every > 1 do not combine (local SGD sends no "
                                   "gradients to compress); use one of them")
        self.rank, self.world = rank, world
        self.compression, self.sync_every = grad_compression, sync_every
        self.ef: Int8ErrorFeedback | None = None
        self.averager = None
        self.since_average = 0  # optimizer steps since the parameters of all ranks were last averaged
        self.steps = 0  # optimizer steps this process has taken (the bytes below are per step of these)
        self.dense_bytes_per_step = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
        if world == 1:
            self.module = model
            return
        self.module = torch.nn.parallel.DistributedDataParallel(model)
        if grad_compression == "int8":
            self.ef = Int8ErrorFeedback(model, world)
            self.module.register_comm_hook(self.ef, int8_ef_hook)
        elif sync_every > 1:
            from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
                PostLocalSGDState,
                post_localSGD_hook,
            )
            from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

            # Global gradient all-reduce for the first start_local_step steps (the lr warmup), then none at all:
            # each rank steps on its own gradients and the averager all-reduces the parameters every H steps.
            hook_state = PostLocalSGDState(None, None, start_local_step, post_local_gradient_allreduce=False)
            self.module.register_comm_hook(hook_state, post_localSGD_hook)
            self.averager = PeriodicModelAverager(period=sync_every, warmup_steps=start_local_step)
            self.hook_state = hook_state

    # -- every step
    def step_end(self, loss: float, stop: bool) -> tuple[float, bool]:
        """(mean loss over the ranks, whether any rank asked to stop): one all-reduce of two numbers."""
        self.steps += 1
        if self.world == 1:
            return loss, stop
        t = torch.tensor([loss, float(stop)], dtype=torch.float64)
        dist.all_reduce(t)
        return t[0].item() / self.world, t[1].item() > 0

    def after_optimizer_step(self, params: Any) -> None:
        """Local SGD: let the averager average the parameters when the period is up."""
        if self.averager is None:
            return
        before = self.averager.step
        averages = before >= self.averager.warmup_steps and (before - self.averager.warmup_steps) % self.sync_every == 0
        self.averager.average_parameters(params)
        self.since_average = 0 if averages or before < self.averager.warmup_steps else self.since_average + 1

    # -- evaluation (collective: every rank calls it at the same step)
    def perplexity(self, model: torch.nn.Module, split: Split, seq_len: int, batch_size: int, device: str) -> dict:
        """`evaluate.perplexity` of the model, each rank evaluating every world-th batch of windows. Under local SGD
        between two averages the ranks' parameters differ: the model evaluated is their average (what the next
        average would make), and each rank gets its own parameters back afterwards."""
        if self.world == 1:
            return perplexity(model, split, seq_len, batch_size, device)
        own = None
        if self.averager is not None and self.since_average:
            own = [p.detach().clone() for p in model.parameters()]
            for p in model.parameters():
                dist.all_reduce(p.data)
                p.data /= self.world
        nll, n = nll_sum(model, split, seq_len, batch_size, device, shard=(self.rank, self.world))
        total = torch.tensor([nll, n], dtype=torch.float64)
        dist.all_reduce(total)
        if own is not None:
            with torch.no_grad():
                for p, mine in zip(model.parameters(), own, strict=True):
                    p.copy_(mine)
        return ppl_from(total[0].item(), int(total[1].item()), split.words)

    # -- checkpoints (collective: every rank calls state_dict at the same step)
    def state_dict(self, global_batch: dict[str, int]) -> dict:
        """The ranks' part of a checkpoint; on rank 0 it holds every rank's residual, elsewhere only its own."""
        out: dict[str, Any] = {"world_size": self.world, "global_sequences": global_batch["sequences"],
                               "grad_compression": self.compression, "sync_every": self.sync_every,
                               "averager_step": None if self.averager is None else self.averager.step,
                               "since_average": self.since_average, "residuals": None}
        if self.ef is not None:
            flat = self.ef.flat_residual()
            parts = [torch.empty_like(flat) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(flat, parts, dst=0)
            out["residuals"] = parts
        return out

    def load_state(self, ckpt: dict, global_batch: dict[str, int]) -> None:
        """Check that `ckpt` can continue at this world size and restore this rank's part. A checkpoint from
        another world size continues when the global batch is the same: the position in the epoch is converted
        (it counts this rank's micro-batches) and the residuals are spread evenly over the new ranks."""
        saved = ckpt.get("distributed") or {"world_size": 1, "residuals": None, "averager_step": None,
                                            "since_average": 0}
        tc = ckpt["train_config"]
        old_world = saved["world_size"]
        old_seqs = saved.get("global_sequences", tc["batch_size"] * tc["grad_accum"] * old_world)
        if old_seqs != global_batch["sequences"]:
            raise DistributedError(
                f"the checkpoint was trained with a global batch of {old_seqs} sequences ({tc['batch_size']} x "
                f"{tc['grad_accum']} x {old_world} ranks), this run has {global_batch['sequences']} "
                f"({global_batch['batch_size']} x {global_batch['grad_accum']} x {self.world}); choose --batch-size "
                f"and --grad-accum with batch x grad-accum x ranks = {old_seqs}, or start a new --out")
        if old_world != self.world or tc["batch_size"] != global_batch["batch_size"]:
            done = ckpt["state"]["batch"] * tc["batch_size"] * old_world  # windows of this epoch used by all ranks
            ckpt["state"]["batch"] = done // (global_batch["batch_size"] * self.world)
        if self.ef is not None and saved.get("residuals") is not None:
            parts = saved["residuals"]
            if len(parts) == self.world:
                self.ef.set_flat_residual(parts[self.rank])
            else:
                self.ef.set_flat_residual(sum(parts) / len(parts))
        if self.averager is not None and saved.get("averager_step") is not None:
            self.averager.step = saved["averager_step"]
            self.hook_state.iter = saved["averager_step"]
            self.since_average = saved.get("since_average", 0)

    def log_fields(self) -> dict:
        """Extra fields of a metrics.jsonl step event: under local SGD, the steps since the last average."""
        return {"since_average": self.since_average} if self.averager is not None else {}

    def report(self) -> dict:
        """What report.json records about the communication (bytes are per optimizer step of this process)."""
        steps = self.steps
        out: dict[str, Any] = {"grad_compression": self.compression, "sync_every": self.sync_every,
                               "fp32_allreduce_bytes_per_step": self.dense_bytes_per_step if self.world > 1 else 0}
        if self.ef is not None and steps:
            out["payload_bytes_per_step"] = self.ef.payload_bytes / steps
            out["measured_fp32_bytes_per_step"] = self.ef.dense_bytes / steps
        return out


# ------------------------------------------------------------------------------------------------ signals
class StopSignals:
    """The first SIGINT or SIGTERM sets `requested` (the loop finishes the step, checkpoints and
    stops; `signum` says which); a second one aborts (KeyboardInterrupt). Installed only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    @property
    def name(self) -> str | None:
        """"SIGINT" / "SIGTERM" once a stop was requested by a signal here, else None."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    def install(self) -> "StopSignals":
        """Catch SIGINT and SIGTERM from now on (main thread only; elsewhere Python cannot); returns self."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self) for s in self.SIGNALS}
        return self

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
