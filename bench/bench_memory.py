"""Memory: peak RSS of loading and running a packed BitNet model vs its fp twin, checkpoint bytes, GPU memory.

`setup_cache` writes the checkpoints once per run into asv's temporary working directory: the BitNet model
through `save_packed` (tq1 storage and i2 compute formats), the fp twin as a plain `torch.save` state dict.
The peakmem benchmarks then load one of them the documented way and run one forward pass, so the number is
what a user pays to serve the model (the process baseline of torch itself is included and the same for both).
"""

from __future__ import annotations

import os

from .common import SEED, cuda_or_skip, need, pin_threads, randint

PRESETS = ["small", "medium"]
KINDS = ["packed", "fp"]
FORMATS = ["tq1", "i2"]
RUN_TOKENS = 64  # one forward pass over (1, 64) token ids


def _modules():
    return need("bitnet_fast.model", "preset_config", "build_model"), need("bitnet_fast.export", "save_packed")


def _factory(preset: str, linear: str):
    M, _ = _modules()
    return lambda: M.build_model(M.preset_config(preset, linear=linear))


def _path(preset: str, kind: str) -> str:
    return f"{preset}-{kind}.ckpt"


def _write_checkpoints() -> dict:
    """Seeded models of every preset: BitNet packed in each format, the fp twin as a state dict."""
    import torch

    try:
        _, ex = _modules()
    except NotImplementedError as e:
        return {"skip": str(e)}
    for preset in PRESETS:
        torch.manual_seed(SEED)
        bitnet = _factory(preset, "bitnet")()
        for fmt in FORMATS:
            ex.save_packed(bitnet, _path(preset, fmt), fmt=fmt)
        torch.manual_seed(SEED)
        torch.save(_factory(preset, "fp")().state_dict(), _path(preset, "fp"))
    return {"skip": None}


def _load(preset: str, kind: str):
    """Load a checkpoint as a user would: load_packed for BitNet (tq1 file), load_state_dict for fp."""
    import torch

    if kind == "packed":
        ex = need("bitnet_fast.export", "load_packed")
        return ex.load_packed(_factory(preset, "bitnet"), _path(preset, "tq1"))
    model = _factory(preset, "fp")()
    model.load_state_dict(torch.load(_path(preset, "fp"), map_location="cpu", weights_only=True))
    return model


class _Cached:
    timeout = 600

    def setup_cache(self) -> dict:
        pin_threads()
        return _write_checkpoints()

    setup_cache.timeout = 900

    def setup(self, cache: dict, *params) -> None:
        if cache["skip"]:
            raise NotImplementedError(cache["skip"])
        pin_threads()


class LoadAndRun(_Cached):
    """Peak RSS of load + one forward pass."""

    params = (PRESETS, KINDS)
    param_names = ("preset", "kind")

    def peakmem_load_and_run(self, cache: dict, preset: str, kind: str) -> None:
        import torch

        model = _load(preset, kind).eval()
        with torch.inference_mode():
            model(randint(model.config.vocab_size, 1, RUN_TOKENS, seed=SEED))


class CheckpointSize(_Cached):
    """Bytes on disk: the packed file in each format vs the fp32 state dict."""

    params = (PRESETS, [*FORMATS, "fp"])
    param_names = ("preset", "format")
    unit = "bytes"

    def track_checkpoint_bytes(self, cache: dict, preset: str, fmt: str) -> int:
        return os.path.getsize(_path(preset, fmt))


class GPUMemory(_Cached):
    """Peak CUDA memory allocated by a model on the GPU and one (4, max_seq_len) forward pass."""

    params = (PRESETS, KINDS)
    param_names = ("preset", "kind")
    unit = "bytes"

    def setup(self, cache: dict, *params) -> None:
        cuda_or_skip()
        super().setup(cache, *params)

    def track_gpu_peak_bytes(self, cache: dict, preset: str, kind: str) -> int:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = _load(preset, kind).eval().to("cuda")
        seq = model.config.max_seq_len
        with torch.inference_mode():
            model(randint(model.config.vocab_size, 4, seq, seed=SEED).to("cuda"))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
