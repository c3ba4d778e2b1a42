"""Model throughput in tokens/s: inference (prefill, decode) and training of the tiny and small presets.

BitNet and its full-precision twin share one config and seed, so each graph shows the ternary model's speed
next to the fp one. BitNet inference runs packed (`pack_model`: ~2 bits/weight, the numba kernels on CPU);
training runs the latent weights through the STE autograd path. Token ids are seeded random: speed does not
depend on the text.
"""

from __future__ import annotations

from .common import SEED, need, pin_threads, randint, rate

PRESETS = ["tiny", "small"]
LINEARS = ["bitnet", "fp"]
PREFILL_BATCH = 4  # sequences of max_seq_len tokens per prefill call
PROMPT, NEW_TOKENS = 16, 16  # greedy decode: prompt length, generated tokens per call
TRAIN_BATCH, TRAIN_SEQ = 8, 128


def _model(preset: str, linear: str, train: bool):
    """A seeded model of `preset`; BitNet inference models are packed. Skips what this commit lacks."""
    import torch

    M = need("bitnet_fast.model", "preset_config", "build_model")
    if linear == "bitnet":
        nn = need("bitnet_fast.nn", "BitLinear", "pack_model")
    torch.manual_seed(SEED)
    model = M.build_model(M.preset_config(preset, linear=linear))
    if linear == "bitnet" and not train:
        nn.pack_model(model)
    return model.train(train)


class Inference:
    """Forward-only throughput; BitNet packed."""

    params = (PRESETS, LINEARS)
    param_names = ("preset", "linear")
    unit = "tokens/s"
    timeout = 300

    def setup(self, preset: str, linear: str) -> None:
        pin_threads()
        self.model = _model(preset, linear, train=False)
        self.vocab = self.model.config.vocab_size
        self.seq = self.model.config.max_seq_len

    def track_prefill(self, preset: str, linear: str) -> float:
        import torch

        idx = randint(self.vocab, PREFILL_BATCH, self.seq, seed=SEED)  # (B, T)
        with torch.inference_mode():
            return rate(lambda: self.model(idx), PREFILL_BATCH * self.seq)

    def track_decode_kv(self, preset: str, linear: str) -> float:
        """Greedy generate with the model's KV cache (one prompt pass, then one M=1 step per token). Named apart
        from the old `track_decode`, which re-ran the whole sequence per token, so asv keeps the series apart."""
        import torch

        if not hasattr(self.model, "setup_cache"):
            raise NotImplementedError("no KV cache at this commit")
        prompt = randint(self.vocab, 1, PROMPT, seed=SEED)  # (1, T0)
        with torch.inference_mode():
            return rate(lambda: self.model.generate(prompt, NEW_TOKENS, temperature=0), NEW_TOKENS, min_calls=2)


class Train:
    """One optimizer step (forward, backward, AdamW) on a fixed (8, 128) batch; "bitnet-int8" is BitNet with the
    int8 input gradient (`--grad-input int8`)."""

    params = (PRESETS, [*LINEARS, "bitnet-int8"])
    param_names = ("preset", "linear")
    unit = "tokens/s"
    timeout = 300

    def setup(self, preset: str, linear: str) -> None:
        import torch

        pin_threads()
        self.model = _model(preset, linear.removesuffix("-int8"), train=True)
        if linear == "bitnet-int8":
            need("bitnet_fast.nn", "set_grad_input").set_grad_input(self.model, "int8")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        seq = min(TRAIN_SEQ, self.model.config.max_seq_len)
        tokens = randint(self.model.config.vocab_size, TRAIN_BATCH, seq + 1, seed=SEED)
        self.idx, self.targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each

    def _step(self) -> None:
        _, loss = self.model(self.idx, self.targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def track_train(self, preset: str, linear: str) -> float:
        return rate(self._step, self.idx.numel())
