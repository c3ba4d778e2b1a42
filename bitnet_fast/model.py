"""A LLaMA-style decoder LM whose linear layers are BitLinear (BitNet b1.58) or nn.Linear (the fp twin).

The two models built from one `ModelConfig` differ only in `config.linear`: every projection inside the
transformer blocks (q, k, v, o, gate, up, down) is a `bitnet_fast.nn.BitLinear` for "bitnet" and an
`nn.Linear` for "fp". Embedding, RMSNorms and the output head stay full precision in both, as in the BitNet
b1.58 recipe. The output head is tied to the token embedding by default (fewer parameters at small scale).
No biases anywhere; RoPE positions; SwiGLU (default) or ReLU^2 MLP; grouped-query attention when n_kv_head < n_head.
With `subln` both twins put an RMSNorm on the inputs of the attention output and MLP down projections (SubLN, as
in BitNet b1.58 2B4T): BitLinear's own `subln` norm for BitNet, the same norm before nn.Linear for fp.

Inference keeps a static per-layer key/value cache (`setup_cache`, as in gpt-fast): `forward(idx, pos=p)` runs the
tokens at positions p.. p + T - 1 against the cache (one call for the prompt, one per generated token) and
`last_logits=True` computes the head for the last position only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loss import linear_cross_entropy

LINEARS = ("bitnet", "fp")
MLPS = ("swiglu", "relu2")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters. `vocab_size` comes from the tokenizer (see data.py)."""

    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 256
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    hidden: int = 688  # MLP inner width (SwiGLU: ~8/3 * n_embd rounded to a multiple of 16)
    max_seq_len: int = 256  # RoPE table length; sequences may not be longer
    mlp: str = "swiglu"  # "swiglu" | "relu2"
    linear: str = "bitnet"  # "bitnet" | "fp"
    tie_embeddings: bool = True
    subln: bool = False  # RMSNorm before the o and down projections (both twins)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.linear not in LINEARS:
            raise ValueError(f"ModelConfig.linear={self.linear!r}; use one of {LINEARS}")
        if self.mlp not in MLPS:
            raise ValueError(f"ModelConfig.mlp={self.mlp!r}; use one of {MLPS}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"ModelConfig.n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size"
            )
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "hidden", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        kv = self.n_kv_head
        if kv is not None and not (1 <= kv <= self.n_head and self.n_head % kv == 0):
            raise ValueError(f"ModelConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


# Presets as data. Parameter counts (tied embeddings, default 8192-token BPE): see `count_parameters`.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, hidden=176, max_seq_len=128),  # tests; trains in seconds
    "small": dict(n_layer=6, n_head=4, n_embd=256, hidden=688, max_seq_len=256),  # ~6.8M
    "medium": dict(n_layer=16, n_head=8, n_embd=512, hidden=1376, max_seq_len=512),  # ~55M
    "large": dict(n_layer=16, n_head=12, n_embd=768, hidden=2048, max_seq_len=512),  # ~120M
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """The named preset as a ModelConfig; `overrides` (vocab_size, linear, ...) replace fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(ModelConfig(**PRESETS[name]), **overrides)


def _linear_cls(kind: str) -> type[nn.Module]:
    if kind == "fp":
        return _fp_linear
    from .nn import BitLinear  # imported lazily: the fp twin needs no kernels

    return BitLinear


def _fp_linear(in_features: int, out_features: int, bias: bool = True, subln: bool = False) -> nn.Linear:
    return SubLNLinear(in_features, out_features, bias) if subln else nn.Linear(in_features, out_features, bias)


class SubLNLinear(nn.Linear):
    """nn.Linear after an RMSNorm of its input: BitLinear(subln=True)'s norm (eps 1e-6, same parameter names), so
    that the fp twin of a SubLN model has exactly the BitNet model's architecture."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.norm = nn.RMSNorm(in_features, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.norm(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_table(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (seq_len, head_dim // 2) for rotary position embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, H, T, D) by the position angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache(nn.Module):
    """Static key/value cache of one attention layer: (B, H_kv, max_len, D) buffers written at positions."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) at positions pos.. and return the cache up to the last one written."""
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        lin = _linear_cls(cfg.linear)
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.n_embd // cfg.n_head
        self.wq = lin(cfg.n_embd, cfg.n_embd, bias=False)
        self.wk = lin(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wv = lin(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wo = lin(cfg.n_embd, cfg.n_embd, bias=False, subln=cfg.subln)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if pos is not None:
            if self.cache is None:
                raise RuntimeError("forward(..., pos=...) needs the KV cache: call model.setup_cache(batch) first")
            k, v = self.cache.update(pos, k, v)  # (B, H_kv, pos + T, D)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if not pos:  # no cache, or the prompt from position 0: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:  # new tokens at pos.. see every cached position up to their own
            allowed = torch.arange(pos + T, device=x.device) <= torch.arange(pos, pos + T, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed if T > 1 else None)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        lin = _linear_cls(cfg.linear)
        self.kind = cfg.mlp
        self.up = lin(cfg.n_embd, cfg.hidden, bias=False)
        self.gate = lin(cfg.n_embd, cfg.hidden, bias=False) if cfg.mlp == "swiglu" else None
        self.down = lin(cfg.hidden, cfg.n_embd, bias=False, subln=cfg.subln)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, pos)
        return x + self.mlp(self.mlp_norm(x))


class LM(nn.Module):
    """Decoder-only LM. forward(idx (B, T)) -> (logits (B, T, V), None); forward(idx, targets (B, T)) -> (None,
    mean loss), the head and its cross-entropy fused (bitnet_fast/loss.py: the logits are never materialized)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        cos, sin = rope_table(cfg.n_embd // cfg.n_head, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) for matrices, residual outputs scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith(("wo.weight", "down.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, pos: int | None = None,
        last_logits: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V) (or (B, 1, V) for the last position with `last_logits`), or with targets
        the mean loss alone. With `pos`, the tokens sit at positions pos.. and attend to the KV cache."""
        T, start = idx.shape[1], pos or 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"positions {start}..{start + T - 1} exceed max_seq_len={self.config.max_seq_len}; "
                             "use shorter inputs")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, pos)
        if targets is None:
            return self.head(self.norm(x[:, -1:] if last_logits else x)), None  # (B, T or 1, V)
        h = self.norm(x).flatten(0, 1)  # (B * T, C)
        if type(self.head) is nn.Linear and self.head.bias is None:  # fused by row chunks: no (B, T, V) logits
            return None, linear_cross_entropy(h, self.head.weight, targets.flatten())
        return None, F.cross_entropy(self.head(h).float(), targets.flatten())  # a head convert() replaced

    def setup_cache(self, batch: int, max_len: int | None = None) -> None:
        """Give every attention layer a static KV cache for `batch` sequences of up to max_len (max_seq_len)."""
        cfg, p = self.config, self.tok_emb.weight
        max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        for block in self.blocks:
            a = block.attn
            block.attn.cache = KVCache(batch, a.n_kv_head, max_len, a.head_dim, p.dtype, p.device)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """idx (B, T) followed by `max_new_tokens` sampled tokens (see `stream`); temperature 0 means greedy."""
        return torch.cat((idx, *self.stream(idx, max_new_tokens, temperature, top_k, generator)), dim=1)

    @torch.no_grad()
    def stream(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield `max_new_tokens` next tokens (B, 1) after idx (B, T), one at a time, with the KV cache.

        One forward for the prompt, then one per token. When the context fills up (max_seq_len), the window
        slides: the newest max_seq_len // 2 tokens are run again from position 0 and generation goes on.
        """
        limit = self.config.max_seq_len
        tokens = idx
        self.setup_cache(idx.shape[0])
        try:
            window = tokens[:, -limit:]
            logits = self(window, pos=0, last_logits=True)[0][:, -1]  # (B, V)
            pos = window.shape[1]
            for i in range(max_new_tokens):
                nxt = sample(logits, temperature, top_k, generator)  # (B, 1)
                yield nxt
                tokens = torch.cat((tokens, nxt), dim=1)
                if i == max_new_tokens - 1:
                    break
                if pos == limit:  # slide the window
                    window = tokens[:, -(limit // 2) :]
                    logits, pos = self(window, pos=0, last_logits=True)[0][:, -1], window.shape[1]
                else:
                    logits, pos = self(nxt, pos=pos, last_logits=True)[0][:, -1], pos + 1
        finally:
            self.clear_cache()


def sample(logits: torch.Tensor, temperature: float, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B, 1) from logits (B, V): argmax at temperature 0, else softmax sampling (top-k if given)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied head counts once)."""
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> LM:
    """A freshly initialised LM on `device` (built under `nn.meta_parameters()`, its parameters stay on the meta
    device for a loader to fill, and `device` must be the CPU)."""
    model = LM(cfg)
    return model if torch.device(device).type == "cpu" else model.to(device)
