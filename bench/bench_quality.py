"""Quality: validation perplexity of BitNet vs its fp twin after the same fixed, seeded training budget.

`setup_cache` trains both models of the `tiny` preset on a slice of WikiText-2 with `bitnet_fast.train.train` (same
seed, data order, schedule and step budget), evaluates the first MAX_LINES lines of the valid split (not all of
it), and the track_ benchmarks report the result. The ratio BitNet ppl / fp ppl is the number to watch: a kernel
or STE change that breaks training shows up here even when every speed benchmark improves. Data is located as the
CLI does (BITNET_FAST_DATA, then the user cache dir); without it the benchmarks are skipped with the reason.
"""

from __future__ import annotations

from .common import SEED, need, pin_threads, wikitext_dir

PRESET = "tiny"
# The budget: 400 steps of (8, 128) tokens per model at peak lr 1e-3, the first 6000 lines of each split (~330k
# train tokens; the valid slice is evaluated before and after) and a 2048-token BPE. Long enough that the BitLinear
# layers matter, stable enough that seeds agree: three seeds give ratios 1.118-1.151 while an STE passing no gradient
# to the weights gives 1.616 (tools/quality_spread.py, docs/benchmarks.md). At lr 3e-3 the seeds spanned 0.86-1.27;
# at 100 steps the same break moved BitNet's ppl by 0.4%.
STEPS, BATCH, SEQ, LR = 400, 8, 128, 1e-3
MAX_LINES, VOCAB = 6000, 2048


def _train_both(
    seed: int = SEED, out: str = ".", models: tuple[str, ...] = ("bitnet", "fp"), grad_input: str | None = None
) -> dict:
    """{"bitnet": report, "fp": report} from two seeded runs, or {"skip": reason} when this commit/machine can't.
    `grad_input` (tools/quality_spread.py) sets BitLinear's input-gradient mode; None keeps the default."""
    try:
        tr = need("bitnet_fast.train", "train", "TrainConfig")
        data_dir = wikitext_dir()
    except NotImplementedError as e:
        return {"skip": str(e)}
    reports = {}
    for linear in models:
        cfg = tr.TrainConfig(
            preset=PRESET, linear=linear, out=f"{out}/run-{linear}", max_steps=STEPS, batch_size=BATCH, seq_len=SEQ,
            lr=LR, seed=seed, overwrite=True, data_dir=str(data_dir), max_lines=MAX_LINES, vocab_size=VOCAB,
            progress=False, **({} if grad_input is None else {"grad_input": grad_input}),
        )
        reports[linear] = tr.train(cfg)
        if "final_valid_ppl" not in reports[linear]:
            raise RuntimeError(f"{linear} training ended without a validation pass: {reports[linear]}")
    return {"skip": None, **reports}


class Quality:
    """BitNet vs fp validation perplexity on WikiText-2 (token level; word level is in the train reports)."""

    timeout = 60

    def setup_cache(self) -> dict:
        pin_threads()
        return _train_both()

    setup_cache.timeout = 1800

    def setup(self, cache: dict) -> None:
        if cache["skip"]:
            raise NotImplementedError(cache["skip"])

    def track_perplexity_ratio(self, cache: dict) -> float:
        """BitNet valid ppl / fp valid ppl (a ratio, 1.0 = parity; was named track_perplexity_delta)."""
        return cache["bitnet"]["final_valid_ppl"] / cache["fp"]["final_valid_ppl"]

    track_perplexity_ratio.unit = "ratio"

    def track_bitnet_valid_ppl(self, cache: dict) -> float:
        return cache["bitnet"]["final_valid_ppl"]

    track_bitnet_valid_ppl.unit = "ppl"

    def track_fp_valid_ppl(self, cache: dict) -> float:
        return cache["fp"]["final_valid_ppl"]

    track_fp_valid_ppl.unit = "ppl"
