"""Side-by-side CPU benchmark of bitnet_fast.BitLinear against fp32 nn.Linear and other BitNet layers.

    python tools/bench_bitlinear.py            # torch.set_num_threads(2), CPU, prints ms and ratios

Cases (all overheads in: module call, activation quant, weight re-pack, allocation):
  infer  packed BitLinear forward at M=1, 4096->4096 under inference_mode, vs fp32 nn.Linear and Hugging Face's
         packed `transformers.integrations.bitnet.BitLinear` (it unpacks the weight on every call)
  train  forward + backward + SGD step at (M=2048, 1024->1024) and (M=512, 4096->4096), vs fp32 nn.Linear,
         transformers' online-quant AutoBitLinear, a plain-torch detach-form STE layer and onebitllms;
         BitLinear twice: the exact STE and `grad_input="int8"` (dY quantized to int8 for the input gradient);
         `--train-shapes small` times the `small` preset's layer shapes instead (M = 32 x 128 tokens; 256->256,
         256->688, 688->256) and a transformer block's mix of them (4 attention, 2 SwiGLU up, 1 down)
  model  the whole `small` model's training step (batch 32 x 128, AdamW, grad clipping: what `bitnet-fast train`
         runs), fp twin vs BitNet with the exact and the int8 input gradient (tied fp head, attention and all);
         then its evaluation forward (no grad, eval mode, batch 16 x 128: one `perplexity` batch), fp vs BitNet
Contenders run interleaved round by round and report the median, so load drift on a shared box hits all alike.
Inference is reported in two cache regimes, because a 4 MB packed weight fits this machine's L3 and a 64 MB fp32
one does not: "warm" times bursts of back-to-back calls (weights cache-resident, as for one layer in a loop) and
"cold" streams 64 MB before every call (weights come from DRAM, as when decoding a model larger than the L3).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from bitnet_fast import kernels
from bitnet_fast.nn import BitLinear

SMALL_PRESET_SHAPES = "4096x256x256,4096x256x688,4096x688x256"  # M x K x N: batch 32 x 128 tokens, C=256, MLP 688
SMALL_BLOCK_MIX = (4, 2, 1)  # per block: q, k, v, o at 256->256; SwiGLU gate and up 256->688; down 688->256


def _ste_fake_quant(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The usual plain-torch STE layer (BitNet paper code / DESIGN.md detach form), in eager torch."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    xq = x + ((x * s).round().clamp(-128, 127) / s - x).detach()
    gamma = w.abs().mean().clamp(min=1e-5)
    wq = w + ((w / gamma).round().clamp(-1, 1) * gamma - w).detach()
    return nn.functional.linear(xq, wq, bias)


class TorchSTE(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ste_fake_quant(x, self.weight, self.bias)


def _hf_packed(k: int, n: int) -> nn.Module:
    from transformers.integrations import bitnet

    layer = bitnet.BitLinear(k, n, bias=False, dtype=torch.float32)
    layer.weight.copy_(bitnet.pack_weights(torch.randint(-1, 2, (n, k), dtype=torch.int8)))
    layer.weight_scale.fill_(0.02)
    return layer


def _hf_online(k: int, n: int) -> nn.Module:
    from transformers.integrations.bitnet import AutoBitLinear

    return AutoBitLinear(k, n, bias=False, online_quant=True)


def _onebitllms(k: int, n: int) -> nn.Module:
    import onebitllms

    layer = onebitllms.BitNetLinear(k, n, bias=False)
    nn.init.normal_(layer.weight, std=0.02)
    return layer


def _bitnet_fast(k: int, n: int, packed: bool, grad_input: str = "exact") -> nn.Module:
    layer = BitLinear(k, n, bias=False, grad_input=grad_input)
    return layer.pack() if packed else layer


def _timer(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


_EVICT = torch.empty(0)


def _flush_caches() -> None:
    """Stream 64 MB (twice this machine's L3) so the next call finds its weights in DRAM."""
    global _EVICT
    if _EVICT.numel() == 0:
        _EVICT = torch.zeros(16 * 1024 * 1024)
    _EVICT.add_(1.0)


def run_side_by_side(
    makers: dict[str, Callable[[], Callable[[], None]]], rounds: int, warmup: int, burst: int = 1, cold: bool = False
) -> dict:
    """Build each contender's step, warm it up (JIT, torch.compile), then time all of them round-robin:
    `burst` back-to-back calls per turn, or one call after a cache flush when `cold`."""
    steps, results = {}, {}
    for name, make in makers.items():
        try:
            step = make()
            for _ in range(warmup):
                step()
            steps[name] = step
        except Exception as e:  # a contender that cannot run here is reported, not fatal
            results[name] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if cold:
                _flush_caches()
            times[name].extend(_timer(step) for _ in range(1 if cold else burst))
    results.update({name: statistics.median(t) for name, t in times.items()})
    return results


def infer_makers(m: int, k: int, n: int) -> dict:
    x = torch.randn(m, k)

    def forward_of(build):
        def make():
            layer = build()

            def step():
                with torch.inference_mode():
                    layer(x)

            return step

        return make

    def kernel_only():
        pw = kernels.pack(torch.randn(n, k))
        return lambda: kernels.bitlinear(x, pw)

    return {
        "fp32 nn.Linear": forward_of(lambda: nn.Linear(k, n, bias=False)),
        "bitnet_fast BitLinear (packed)": forward_of(lambda: _bitnet_fast(k, n, packed=True)),
        "bitnet_fast kernels.bitlinear (no module)": kernel_only,
        "transformers BitLinear (packed)": forward_of(lambda: _hf_packed(k, n)),
    }


def train_makers(m: int, k: int, n: int) -> dict:
    x = torch.randn(m, k, requires_grad=True)
    gy = torch.randn(m, n)

    def step_of(build):
        def make():
            layer = build()
            opt = torch.optim.SGD(layer.parameters(), lr=1e-4)

            def step():
                layer(x).backward(gy)
                opt.step()  # changes the weight, so BitLinear re-packs every step, as in real training
                opt.zero_grad(set_to_none=True)
                x.grad = None

            return step

        return make

    return {
        "fp32 nn.Linear": step_of(lambda: nn.Linear(k, n, bias=False)),
        "bitnet_fast BitLinear": step_of(lambda: _bitnet_fast(k, n, packed=False)),
        "bitnet_fast BitLinear (int8 grad_input)": step_of(lambda: _bitnet_fast(k, n, False, grad_input="int8")),
        "torch detach-STE (eager)": step_of(lambda: TorchSTE(k, n, bias=False)),
        "transformers AutoBitLinear (online)": step_of(lambda: _hf_online(k, n)),
        "onebitllms BitNetLinear": step_of(lambda: _onebitllms(k, n)),
    }


def model_makers(preset: str = "small", batch: int = 32, seq: int = 128) -> dict:
    """The whole model's optimizer step, as train.py takes it, for the fp twin and BitNet (exact / int8 dx)."""
    from bitnet_fast.model import build_model, preset_config
    from bitnet_fast.nn import set_grad_input
    from bitnet_fast.recipe import param_groups

    tokens = torch.randint(0, preset_config(preset).vocab_size, (batch, seq + 1))

    def step_of(linear: str, grad_input: str):
        def make():
            torch.manual_seed(0)
            model = set_grad_input(build_model(preset_config(preset, linear=linear)), grad_input)
            opt = torch.optim.AdamW(param_groups(model, 0.1), lr=2e-3, betas=(0.9, 0.95))

            def step():
                model(tokens[:, :-1], tokens[:, 1:])[1].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step

        return make

    return {
        "fp twin (nn.Linear)": step_of("fp", "exact"),
        "BitNet, exact STE": step_of("bitnet", "exact"),
        "BitNet, int8 grad_input": step_of("bitnet", "int8"),
    }


def eval_makers(preset: str = "small", batch: int = 16, seq: int = 128) -> dict:
    """The whole model's evaluation forward (no grad, eval mode, loss), as `perplexity` takes it per batch of
    --eval-batch-size windows, for the fp twin and BitNet."""
    from bitnet_fast.model import build_model, preset_config

    tokens = torch.randint(0, preset_config(preset).vocab_size, (batch, seq + 1))

    def forward_of(linear: str):
        def make():
            torch.manual_seed(0)
            model = build_model(preset_config(preset, linear=linear)).eval()

            def forward():
                with torch.no_grad():
                    model(tokens[:, :-1], tokens[:, 1:])

            return forward

        return make

    return {"fp twin (nn.Linear)": forward_of("fp"), "BitNet": forward_of("bitnet")}


def print_table(title: str, results: dict, base: str) -> None:
    print(f"\n### {title}\n")
    print("| implementation | ms | vs fp32 |")
    print("|---|---:|---:|")
    ref = results.get(base)
    for name, v in results.items():
        if isinstance(v, str):
            print(f"| {name} | {v} | |")
        else:
            print(f"| {name} | {v:.3f} | {ref / v:.2f}x |" if isinstance(ref, float) else f"| {name} | {v:.3f} | |")


def _train_shapes(text: str) -> list[tuple[int, int, int]] | str:
    """--train-shapes: 'small', or MxKxN,... of positive integers (an argparse error names a malformed one)."""
    if text == "small":
        return text
    try:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: give MxKxN,... of positive integers (e.g. 4096x256x688) "
                                         "or 'small'")
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds per case (median reported)")
    ap.add_argument("--only", choices=["infer", "train", "model"], default=None)
    ap.add_argument("--train-shapes", default="2048x1024x1024,512x4096x4096", type=_train_shapes,
                    help="MxKxN,... for the training step, or 'small' (the small preset's layers; default %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads={args.threads}, CPU backend: {kernels.backend_for('cpu')}")
    print("'vs fp32' = fp32 time / this time (higher is faster)")
    if args.only in (None, "infer"):
        makers = infer_makers(1, 4096, 4096)
        res = run_side_by_side(makers, rounds=args.rounds, warmup=5, burst=50)
        print_table("Inference forward, M=1, 4096 -> 4096, warm (back-to-back calls)", res, "fp32 nn.Linear")
        res = run_side_by_side(makers, rounds=args.rounds * 10, warmup=5, cold=True)
        print_table("Inference forward, M=1, 4096 -> 4096, cold (L3 flushed before each call)", res, "fp32 nn.Linear")
    if args.only in (None, "train"):
        spec = _train_shapes(SMALL_PRESET_SHAPES) if args.train_shapes == "small" else args.train_shapes
        block: dict = {}
        for i, (m, k, n) in enumerate(spec):
            res = run_side_by_side(train_makers(m, k, n), rounds=args.rounds, warmup=3)
            print_table(f"Training step (fwd + bwd + SGD), M={m}, {k} -> {n}", res, "fp32 nn.Linear")
            if args.train_shapes == "small":
                for name, v in res.items():
                    done = isinstance(v, float) and isinstance(block.get(name, 0.0), float)
                    block[name] = block.get(name, 0.0) + SMALL_BLOCK_MIX[i] * v if done else v
        if block:
            print_table("Training step, one `small` block's seven projections (sum of the above, 4:2:1)", block,
                        "fp32 nn.Linear")
    if args.only in (None, "model"):
        # warm-up 3: a model's first steps fault its heap in (the fp twin's first timed step after one warm-up took
        # 5.3 s against 1.8 s steady on Zen 3, 95k page faults), which one warm-up step left in the medians
        res = run_side_by_side(model_makers(), rounds=max(5, args.rounds // 3), warmup=3)
        print_table("Whole `small` model training step (batch 32 x 128, AdamW, clipping)", res, "fp twin (nn.Linear)")
        res = run_side_by_side(eval_makers(), rounds=args.rounds, warmup=2)
        print_table("Whole `small` model evaluation forward (no grad, batch 16 x 128, as `perplexity`)", res,
                    "fp twin (nn.Linear)")


if __name__ == "__main__":
    main()
