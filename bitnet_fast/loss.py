"""The LM head and its cross-entropy in one pass over row chunks, never holding the (N, V) logits.

`F.cross_entropy(h @ W.T, t)` materializes the logits, their log-softmax and, in backward, their gradient: three
(N, V) fp32 arrays (at the `small` preset's batch, 4096 x 8192: 134 MB each) written fresh every step. On a CPU VM
their page faults alone cost more than the head's GEMMs (145k faults, 0.48 s of kernel time per `small` step). Here
each chunk of rows computes its logits, log-sum-exp and loss, then at once its softmax-minus-one-hot gradient and
that gradient's two products (dh and the chunk's share of dW), so the largest temporary is one chunk's logits
(`CHUNK_BYTES`, cache-sized on the CPU). The loss is a scalar: backward only scales the stored gradients. The same
three GEMMs run as in the unfused head. (Liger-Kernel's fused linear cross-entropy does the same on GPUs.)
"""

from __future__ import annotations

import torch

__all__ = ["linear_cross_entropy"]

# fp32 logits per chunk: CPU chunks stay near the L3 (larger ones measured no faster on Zen 3), GPU chunks are
# large enough that a typical batch runs in one or a few GEMMs.
CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 1 << 30}


def chunk_bytes(device: str | torch.device) -> int:
    """Bytes of fp32 logits one chunk holds on `device` (CPU, else the GPU budget)."""
    return CHUNK_BYTES["cpu" if torch.device(device).type == "cpu" else "cuda"]


def _chunk_logits(hc: torch.Tensor, w: torch.Tensor, tc: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(fp32 logits (c, V), their log-sum-exp (c,), summed NLL of the chunk's targets)."""
    z = (hc @ w.T).float()  # (c, V)
    lse = torch.logsumexp(z, dim=1)  # (c,)
    return z, lse, (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """(h (N, C), w (V, C), targets (N,), rows, need_dh, need_dw) -> summed NLL; the gradients are computed in
    forward, chunk by chunk, and backward scales them by the incoming scalar."""

    @staticmethod
    def forward(ctx, h, w, targets, rows, need_dh, need_dw):
        n = h.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_dh else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
        for i in range(0, n, rows):
            hc, tc = h[i : i + rows], targets[i : i + rows]
            z, lse, nll = _chunk_logits(hc, w, tc)
            total += nll
            z -= lse[:, None]  # log-softmax in place; then softmax - one-hot
            z.exp_()
            z[torch.arange(z.shape[0], device=z.device), tc] -= 1.0
            dz = z.to(h.dtype)  # (c, V): d(summed NLL) / d(logits)
            if need_dh:
                torch.mm(dz, w, out=dh[i : i + rows])  # (c, C)
            if need_dw:
                if dw.dtype == dz.dtype:
                    dw.addmm_(dz.T, hc)  # (V, C)
                else:
                    dw += (dz.T @ hc).float()
        ctx.save_for_backward(*(g for g in (dh, dw) if g is not None))
        ctx.need, ctx.w_dtype = (need_dh, need_dw), w.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        saved = iter(ctx.saved_tensors)
        dh = next(saved) * g if ctx.need[0] else None  # a 0-dim fp32 g keeps dh's dtype
        dw = (next(saved) * g).to(ctx.w_dtype) if ctx.need[1] else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """`F.cross_entropy(h @ weight.T, targets, reduction=...)` (logits in fp32) for h (N, C), weight (V, C) and
    targets (N,) int64, without the (N, V) logits; reduction "mean" or "sum"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if h.ndim != 2 or weight.ndim != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"expected h (N, C), weight (V, C), targets (N,); got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    n, vocab = h.shape[0], weight.shape[0]
    if n == 0:
        raise ValueError("linear_cross_entropy needs at least one row")
    rows = max(1, min(n, chunk_bytes(h.device) // (4 * vocab)))
    need_dh = torch.is_grad_enabled() and h.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    if need_dh or need_dw:
        total = _LinearCrossEntropy.apply(h, weight, targets, rows, need_dh, need_dw)
    else:
        total = sum(_chunk_logits(h[i : i + rows], weight, targets[i : i + rows])[2] for i in range(0, n, rows))
    return total / n if reduction == "mean" else total
