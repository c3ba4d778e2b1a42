"""Fast CPU inference for whole packed BitNet models: bitnet-fast's own LM and converted Hugging Face Llamas.

`PackedDecoder.from_model(model)` takes a packed model (its BitLinear layers reference the same i2 tensors, no
copy) and runs prefill and decode as one Numba call per step over a static KV cache (`kernels.cpu_model`):
no per-op Python or torch dispatch between the 7 projections of each layer. The output head (and optionally
the embedding) is stored in int8 with a scale per row: a 32000 x 2048 head reads 65 MB per token instead of
262 MB in fp32.

    dec = PackedDecoder.from_model(model, head="int8")
    for token in dec.generate(prompt_ids, max_new_tokens=64, temperature=0):
        ...

One sequence at a time (batch 1). Generation stops at the context length it was built for (`max_len`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bitnet_fast.kernels import reference
from bitnet_fast.nn import BitLinear

__all__ = ["HEADS", "DecoderConfig", "PackedDecoder"]

HEADS = ("fp32", "int8")
KEYS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections of a layer, in the order of Weights.ptrs


@dataclass(frozen=True)
class DecoderConfig:
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    hidden: int  # MLP inner width
    vocab_size: int
    eps: float  # RMSNorm epsilon of the block and final norms
    swiglu: bool  # SwiGLU MLP (else ReLU^2)
    max_len: int  # static KV cache length = longest context


@dataclass
class _Layer:
    """One decoder layer's tensors, as the builder extracts them from a model."""

    projections: dict[str, BitLinear]  # q, k, v, o, gate (SwiGLU only), up, down
    norm_attn: torch.Tensor
    norm_mlp: torch.Tensor


def _i2(layer: BitLinear, name: str) -> tuple[np.ndarray, float]:
    if layer.bias is not None:
        raise ValueError(f"{name} has a bias; the decoder runtime supports bias-free projections (Llama family)")
    pw = layer.packed_weight
    if pw.device.type != "cpu" or pw.format != "i2":
        raise ValueError(f"{name} is packed as {pw.format} on {pw.device}; the decoder runtime runs i2 on the CPU")
    return pw.data.numpy(), pw.gamma.item()


def _int8_rows(w: torch.Tensor | tuple) -> tuple[np.ndarray, np.ndarray]:
    """(int8 (N, K), fp32 row scales (N,)) of a float matrix, or of an (int8, scales) pair quantized already
    (tensors or NumPy arrays: an np.memmap embedding stays on disk but for the rows a prompt touches)."""
    if isinstance(w, tuple):
        q, scale = (t if isinstance(t, np.ndarray) else t.detach().contiguous().numpy() for t in w)
        if q.dtype != np.int8 or q.ndim != 2 or scale.shape != q.shape[:1]:
            raise ValueError(f"an int8 matrix needs (int8 (N, K), scales (N,)), got {q.dtype} {q.shape}, "
                             f"{scale.shape}")
        return q, scale.astype(np.float32, copy=False)
    return tuple(t.numpy() for t in reference.int8_quant_rows(w.detach()))


def _sub_norm(layers: list[_Layer], key: str) -> tuple[np.ndarray, float]:
    """SubLN weights (L, width) of the `key` projections' inputs, or (L, 0) when the model has none."""
    norms = [layer.projections[key].norm for layer in layers]
    if all(n is None for n in norms):
        return np.zeros((len(layers), 0), np.float32), 1e-6
    if any(n is None for n in norms):
        raise ValueError(f"some but not all {key} projections have a SubLN norm")
    return np.stack([n.weight.detach().float().numpy() for n in norms]), float(norms[0].eps)


def _lm_parts(lm: nn.Module, max_len: int | None) -> dict:
    """PackedDecoder arguments for a bitnet_fast LM."""
    c = lm.config
    layers = [_Layer({"q": b.attn.wq, "k": b.attn.wk, "v": b.attn.wv, "o": b.attn.wo, "up": b.mlp.up,
                      "down": b.mlp.down, **({"gate": b.mlp.gate} if b.mlp.gate is not None else {})},
                     b.attn_norm.weight, b.mlp_norm.weight) for b in lm.blocks]
    max_len = min(max_len or c.max_seq_len, c.max_seq_len)
    cfg = DecoderConfig(c.n_layer, c.n_head, c.kv_heads, c.n_embd // c.n_head, c.hidden, c.vocab_size,
                        c.norm_eps, c.mlp == "swiglu", max_len)
    return dict(config=cfg, layers=layers, embedding=lm.tok_emb.weight, norm_final=lm.norm.weight,
                head_weight=lm.head.weight, cos=lm.rope_cos[:max_len], sin=lm.rope_sin[:max_len])


def _hf_parts(model: nn.Module, max_len: int | None) -> dict:
    """PackedDecoder arguments for a Hugging Face Llama-family CausalLM (its own RoPE tables, any rope_type)."""
    c = model.config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False) or c.hidden_act != "silu":
        raise ValueError("the decoder runtime supports Llama-family models without biases and with SiLU (SwiGLU)")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    max_len = min(max_len or c.max_position_embeddings, c.max_position_embeddings)
    layers = [_Layer({"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "gate": m.gate_proj,
                      "up": m.up_proj, "down": m.down_proj}, layer.input_layernorm.weight,
                     layer.post_attention_layernorm.weight)
              for layer in model.model.layers for a, m in [(layer.self_attn, layer.mlp)]]
    cfg = DecoderConfig(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, head_dim,
                        c.intermediate_size, c.vocab_size, c.rms_norm_eps, True, max_len)
    with torch.no_grad():  # cos/sin (1, T, D) with the halves repeated
        cos, sin = model.model.rotary_emb(torch.zeros(1, 1, head_dim), torch.arange(max_len)[None])
    return dict(config=cfg, layers=layers, embedding=model.model.embed_tokens.weight,
                norm_final=model.model.norm.weight, head_weight=model.lm_head.weight,
                cos=cos[0, :, : head_dim // 2], sin=sin[0, :, : head_dim // 2])


def _runtime_arrays(config: DecoderConfig, layers: list[_Layer], embedding: torch.Tensor | tuple,
                    norm_final: torch.Tensor, head_weight: torch.Tensor | tuple, cos: torch.Tensor, sin: torch.Tensor,
                    head: str, embedding_int8: bool) -> dict:
    """PackedDecoder's arguments (NumPy arrays) from a model's modules. Embedding and head are float matrices, or
    (int8, row scales) pairs quantized already (int8 use only)."""
    if head not in HEADS:
        raise ValueError(f"head={head!r}; use one of {HEADS}")
    for i, layer in enumerate(layers):
        for key, proj in layer.projections.items():
            if not isinstance(proj, BitLinear):
                raise TypeError(f"layer {i} {key} is a {type(proj).__name__}, not a BitLinear: "
                                "convert(model, pack=True) first")
            if proj.norm is not None and key not in ("o", "down"):
                raise ValueError(f"a SubLN norm on the {key} projection is not supported (only before o and down)")
    keys = [k for k in KEYS if k in layers[0].projections]
    packed = {k: [_i2(layer.projections[k], f"layer {i} {k}") for i, layer in enumerate(layers)] for k in keys}
    (sub_o, eps_o), (sub_d, eps_d) = _sub_norm(layers, "o"), _sub_norm(layers, "down")
    arrays = {
        "projections": {k: [w for w, _ in packed[k]] for k in keys},
        "gammas": np.array([[packed[k][i][1] if k in packed else 0.0 for k in KEYS] for i in range(config.n_layer)],
                           np.float32),  # (L, 7)
        "norm_attn": np.stack([layer.norm_attn.detach().float().numpy() for layer in layers]),
        "norm_mlp": np.stack([layer.norm_mlp.detach().float().numpy() for layer in layers]),
        "norm_final": norm_final.detach().float().contiguous().numpy(), "sub_o": sub_o, "sub_d": sub_d,
        "sub_eps": eps_o if sub_o.shape[1] else eps_d,
        "cos": cos.float().contiguous().numpy(), "sin": sin.float().contiguous().numpy(),
    }
    if head == "int8":
        from bitnet_fast.kernels.cpu_model import pad_rows

        q, scale = _int8_rows(head_weight)
        arrays["head"] = (q if q.shape[1] % 32 == 0 else pad_rows(q), scale)
    else:
        arrays["head"] = head_weight.detach().float().contiguous().numpy()
    if not (embedding_int8 or isinstance(embedding, tuple)):
        arrays["embedding"] = embedding.detach().float().contiguous().numpy()
    elif head_weight is embedding and head == "int8":  # tied: the head's int8 rows, without their padding
        arrays["embedding"] = (arrays["head"][0][:, : norm_final.shape[0]], arrays["head"][1])
    else:
        arrays["embedding"] = _int8_rows(embedding)
    return arrays


class PackedDecoder:
    """A packed Llama-family decoder for fast CPU inference (one sequence; see the module docstring)."""

    def __init__(self, config: DecoderConfig, projections: dict[str, list[np.ndarray]], gammas: np.ndarray,
                 norm_attn: np.ndarray, norm_mlp: np.ndarray, norm_final: np.ndarray, sub_o: np.ndarray,
                 sub_d: np.ndarray, sub_eps: float, cos: np.ndarray, sin: np.ndarray,
                 head: tuple[np.ndarray, np.ndarray] | np.ndarray,
                 embedding: tuple[np.ndarray, np.ndarray] | np.ndarray) -> None:
        """From the runtime's arrays (`from_model` and `decoder_file.load_decoder` make them): i2 `projections`
        {q, k, v, o, [gate,] up, down: one (N, K/4) array per layer}, their `gammas` (L, 7) in KEYS order, the norms
        (L, C) / (C,), SubLN weights (L, width) or (L, 0), RoPE tables (T, D/2) with T >= config.max_len; `head`
        (int8 (V, Kp) with Kp a multiple of 32, fp32 row scales) or fp32 (V, C); `embedding` likewise unpadded."""
        from bitnet_fast.kernels.cpu_model import Weights

        keys = KEYS if config.swiglu else ("q", "k", "v", "o", "up", "up", "down")  # the kernel skips gate
        for k in set(keys):
            if len(projections[k]) != config.n_layer:
                raise ValueError(f"{len(projections[k])} {k} projections for {config.n_layer} layers")
            if len({w.shape for w in projections[k]}) != 1:
                raise ValueError(f"the {k} projections differ in shape across layers; the runtime needs one shape")
        self.config, self.head_kind = config, "int8" if isinstance(head, tuple) else "fp32"
        self._projections = projections  # kept alive: the kernel reads them by address
        self._weights = Weights(
            n_head=config.n_head, eps=config.eps, swiglu=config.swiglu, norm_attn=norm_attn, norm_mlp=norm_mlp,
            norm_final=norm_final, ptrs=np.array([[w.ctypes.data for w in projections[k]] for k in keys], np.int64),
            shapes=np.array([projections[k][0].shape for k in keys], np.int64),  # (7, 2)
            gammas=gammas, sub_o=sub_o, sub_d=sub_d, sub_eps=sub_eps, cos=cos, sin=sin)
        self._weights_args = tuple(self._weights)  # what cpu_model.forward takes (see Weights)
        if self.head_kind == "int8":
            self._head_q, self._head_scale = head
        else:
            self._head = torch.from_numpy(head)
        self._embed = embedding
        shape = (config.n_layer, config.n_kv_head, config.max_len, config.head_dim)  # (L, H_kv, T, D)
        self._v = np.zeros(shape, np.float32)
        self._k = np.zeros((*shape[:2], config.head_dim, config.max_len), np.float32)  # keys: (L, H_kv, D, T)
        self.pos = 0
        self.tokenizer: str | None = None  # the tokenizer JSON a decoder file carries (decoder_file.load_decoder)

    def __reduce__(self):
        """Copies and pickles are refused: the kernel reads the weights by address (a copy would read the
        original's buffers) and the KV cache belongs to one sequence."""
        raise TypeError("a PackedDecoder cannot be copied or pickled (it reads its weights by address); build "
                        "another with PackedDecoder.from_model(model) or decoder_file.load_decoder(path)")

    # ------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_model(cls, model: nn.Module, head: str = "int8", embedding_int8: bool = False,
                   max_len: int | None = None, *, embedding: tuple | None = None,
                   head_weight: tuple | None = None) -> PackedDecoder:
        """From a packed bitnet_fast LM or a converted, packed Hugging Face Llama-family CausalLM. `embedding` /
        `head_weight`: (int8, row scales) to use instead of the model's (e.g. left on the meta device)."""
        if hasattr(model, "blocks") and hasattr(model, "tok_emb"):
            parts = _lm_parts(model, max_len)
        elif hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model, "lm_head"):
            parts = _hf_parts(model, max_len)
        else:
            raise TypeError(f"{type(model).__name__} is neither a bitnet_fast LM nor a Hugging Face Llama-family model")
        if embedding is not None:
            parts["embedding"] = embedding
        if head_weight is not None:
            parts["head_weight"] = head_weight
        return cls(parts["config"], **_runtime_arrays(**parts, head=head, embedding_int8=embedding_int8))

    # ------------------------------------------------------------------------------------------- running
    @property
    def nbytes(self) -> int:
        """Bytes of the weights this decoder reads (packed projections, norms, embedding, head) and its KV cache."""
        w = self._weights
        arrays = [*(a for ws in self._projections.values() for a in ws), self._k, self._v, w.norm_attn, w.norm_mlp,
                  w.norm_final]
        arrays += [*self._embed] if isinstance(self._embed, tuple) else [self._embed]
        arrays += [self._head_q, self._head_scale] if self.head_kind == "int8" else [self._head.numpy()]
        return sum(a.nbytes for a in {id(a): a for a in arrays}.values())

    def reset(self) -> None:
        """Forget the context (the cache is overwritten from position 0)."""
        self.pos = 0

    def _embed_rows(self, ids: Sequence[int]) -> np.ndarray:
        if isinstance(self._embed, tuple):
            q, scale = self._embed
            return (q[list(ids)].astype(np.float32) * scale[list(ids), None]).astype(np.float32)
        return self._embed[list(ids)].copy()

    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        """Run the tokens `ids` at the current position and return the next-token logits (V,) fp32."""
        from bitnet_fast.kernels import cpu, cpu_model

        cfg = self.config
        if not ids:
            raise ValueError("ids is empty: give at least one token")
        if self.pos + len(ids) > cfg.max_len:
            raise ValueError(f"the context is full: {self.pos} + {len(ids)} tokens exceed max_len={cfg.max_len}")
        bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {cfg.vocab_size})")
        p, threads = cpu.params(), cpu.threads(1 << 30)
        h = cpu_model.forward(self._embed_rows(ids), self.pos, self._weights_args, self._k, self._v,
                              cpu.tiling(p, len(ids), threads))
        self.pos += len(ids)
        if self.head_kind == "int8":
            return torch.from_numpy(cpu_model.int8_gemv(h[0], self._head_q, self._head_scale, threads))
        return torch.from_numpy(h[0]) @ self._head.T

    def generate(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None) -> Iterator[int]:
        """Yield up to `max_new_tokens` tokens after `prompt` (from a fresh context); stops when the context is full.
        Temperature 0 is greedy; otherwise softmax sampling (top-k if given), seeded by `seed`."""
        if not prompt:
            raise ValueError("prompt is empty: give at least one token")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature={temperature} must be a finite number >= 0")
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(rng.randrange(2**63))
        self.reset()
        logits = self.forward(list(prompt))
        for i in range(max_new_tokens):
            if temperature == 0:
                tok = int(logits.argmax())
            else:
                z = logits / temperature
                if top_k is not None:
                    z = z.masked_fill(z < torch.topk(z, min(top_k, z.numel())).values[-1], float("-inf"))
                tok = int(torch.multinomial(torch.softmax(z, dim=-1), 1, generator=gen))
            yield tok
            if i == max_new_tokens - 1 or self.pos >= self.config.max_len:
                return
            logits = self.forward([tok])
