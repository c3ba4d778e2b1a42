"""`bitnet-fast`: the command line. Thin on purpose: each command parses its flags and calls a library function.

Errors users can fix (bad flags, missing data, corrupt checkpoints or shards) print one line on stderr and
exit non-zero; no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .model import PRESETS
from .plumbing import UserError


class _Group(click.Group):
    """Turns library errors (UserError, ValueError, OSError) into one-line ClickExceptions."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UserError, ValueError, OSError) as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="bitnet-fast")
def main() -> None:
    """bitnet-fast: fast BitNet b1.58 (ternary-weight) training and inference."""


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder for shards.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False),
              help="Reuse this tokenizer.json instead of training one on INPUTS.")
@click.option("--kind", type=click.Choice(["bpe", "word"]), default="bpe", show_default=True)
@click.option("--vocab-size", type=click.IntRange(min=4), default=8192, show_default=True)
@click.option("--shard-tokens", type=click.IntRange(min=1), default=1 << 24, show_default=True)
def prepare(inputs, out_dir, tokenizer_path, kind, vocab_size, shard_tokens) -> None:
    """Tokenize text files INPUTS into checksummed binary token shards in --out."""
    from .data import load_tokenizer
    from .data import prepare as prepare_corpus

    tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
    manifest = prepare_corpus(inputs, out_dir, tok, kind, vocab_size, shard_tokens)
    for name, s in manifest["splits"].items():
        click.echo(f"{name}: {s['tokens']:,} tokens ({s['words']:,} words) in {len(s['files'])} shard(s)")
    click.echo(f"vocab {manifest['vocab_size']}; wrote {out_dir}/manifest.json")


@main.command()
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="small", show_default=True)
@click.option("--model", "which", type=click.Choice(["bitnet", "fp", "both"]), default="both", show_default=True,
              help="BitNet, its full-precision twin, or both one after the other.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after N optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "two_stage"]), default="cosine", show_default=True)
@click.option("--tokenizer", type=click.Choice(["bpe", "word"]), default="bpe", show_default=True)
@click.option("--vocab-size", type=click.IntRange(min=16), default=8192, show_default=True)
@click.option("--max-lines", type=click.IntRange(min=1), default=None, help="Use only the first N lines per split.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="WikiText-2 folder.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="[default: runs/PRESET]")
@click.option("--ckpt-every", type=click.IntRange(min=1), default=200, show_default=True,
              help="Optimizer steps between checkpoints (one is also written at each epoch end).")
@click.option("--keep-last", type=click.IntRange(min=1), default=2, show_default=True, help="Checkpoints kept.")
@click.option("--resume", is_flag=True, help="Continue from the newest valid checkpoint in --out.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--distributed", is_flag=True, help="Use torch.distributed (DDP) when launched by torchrun.")
@click.option("--no-progress", is_flag=True, help="No tqdm bar (logs still go to metrics.jsonl).")
def train(which, out_dir, no_progress, **kw) -> None:
    """Train on WikiText-2; writes OUT/report.json (OUT/bitnet and OUT/fp with --model both)."""
    from .train import TrainConfig
    from .train import train as run_training

    if kw["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda but no CUDA GPU is available; use --device cpu")
    out = Path(out_dir or f"runs/{kw['preset']}")
    models = ["bitnet", "fp"] if which == "both" else [which]
    reports = {}
    for linear in models:
        cfg = TrainConfig(linear=linear, out=str(out / linear if which == "both" else out),
                          progress=not no_progress, **kw)
        reports[linear] = run_training(cfg)
        if reports[linear]["interrupted"]:
            click.echo(f"interrupted: checkpoint saved in {cfg.out}/checkpoints; continue with --resume", err=True)
            sys.exit(130)
    if which == "both":
        click.echo(_side_by_side(reports))
        (out / "summary.json").write_text(json.dumps(
            {m: {k: r.get(k) for k in ("parameters", "initial_valid_ppl", "final_valid_ppl", "final_valid_word_ppl",
                                       "mean_tokens_per_sec", "total_seconds", "peak_rss_bytes")}
             for m, r in reports.items()}, indent=1))
    click.echo(f"report: {out}/" + ("{bitnet,fp}/report.json" if which == "both" else "report.json"))


def _side_by_side(reports: dict[str, dict]) -> str:
    rows = [("", *reports), ("parameters", *(f"{r['parameters']:,}" for r in reports.values()))]
    for key, label in (("initial_valid_ppl", "valid ppl before"), ("final_valid_ppl", "valid ppl after"),
                       ("final_valid_word_ppl", "valid word ppl after"), ("mean_tokens_per_sec", "train tokens/s"),
                       ("total_seconds", "train seconds")):
        rows.append((label, *(f"{r[key]:.2f}" if r.get(key) is not None else "-" for r in reports.values())))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  " + "  ".join(f"{c:>12}" for c in r[1:]) for r in rows)


@main.command(name="eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="WikiText-2 folder.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(checkpoint, split, data_dir, batch_size, device, as_json) -> None:
    """Token- and word-level perplexity of a training CHECKPOINT on a WikiText-2 split."""
    from .evaluate import evaluate_checkpoint

    r = evaluate_checkpoint(checkpoint, split, data_dir, batch_size, device)
    if as_json:
        click.echo(json.dumps(r, indent=1))
    else:
        click.echo(f"{r['model']} step {r['step']} on {split}: ppl {r['ppl']:.3f} (token, {r['tokens']:,} tokens), "
                   f"word ppl {r['word_ppl']:.3f} ({r['words']:,} words)")


@main.command(name="calibrate")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON (progress goes to stderr).")
@click.option("--quick", is_flag=True, help="tiny/small presets, few repeats: under a minute.")
@click.option("--target-seconds", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Training step time to size the recommended batch for.")
@click.option("--preset", "presets", multiple=True, type=click.Choice(sorted(PRESETS)),
              help="Only these presets (repeatable).")
@click.option("--seq-len", type=click.IntRange(min=8), default=None, help="Training sequence length [128; quick 64].")
@click.option("--no-save", is_flag=True, help="Measure only; leave the kernel tuning file alone.")
def calibrate_(as_json, quick, target_seconds, presets, seq_len, no_save) -> None:
    """Time and tune the kernels on this machine (saved for later runs); tokens/sec and batch sizes per preset."""
    from .calibrate import calibrate, format_table

    result = calibrate(quick=quick, target_seconds=target_seconds, presets=presets or None, seq_len=seq_len,
                       save=not no_save, echo=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(result, indent=1) if as_json else format_table(result))


@main.command(name="report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default="bitnet-fast-report.html", show_default=True,
              help="HTML file to write; the JSON goes next to it (.json).")
@click.option("--tinyllama/--no-tinyllama", default=True, show_default=True,
              help="Include TinyLlama-1.1B BitNet/fp32/bf16 measurements (cached; minutes the first time).")
@click.option("--quick", is_flag=True, help="TinyLlama with 2 of 22 layers (labelled QUICK in the report).")
@click.option("--remeasure", is_flag=True, help="Ignore cached TinyLlama measurements.")
def report_(dirs, out, tinyllama, quick, remeasure) -> None:
    """One self-contained HTML report (+ JSON) from the run DIRS written by `bitnet-fast train`."""
    from .report import make_report

    html_path, json_path = make_report(dirs, out, tinyllama, quick, remeasure, echo=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {html_path} and {json_path}")


if __name__ == "__main__":  # `python -m bitnet_fast.cli` (e.g. under torchrun)
    main()
