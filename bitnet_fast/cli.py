"""`bitnet-fast`: the command line. Thin on purpose: each command parses its flags, calls a library function and
prints. The options of `train` are built from the fields of `TrainConfig`, where their defaults live.

Errors users can fix (bad flags, missing data, corrupt checkpoints or shards) print one line on stderr and
exit non-zero (2 for usage errors, 1 otherwise, 130 after Ctrl-C); no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from collections.abc import Callable

import click

from .data import TOKENIZERS
from .model import LINEARS, PRESETS
from .plumbing import UserError
from .train import DEVICES, TrainConfig, side_by_side, train_pair
from .train import train as train_one


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
@click.option("--kind", type=click.Choice(TOKENIZERS), default="bpe", show_default=True)
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


def config_options(cls: type) -> Callable:
    """Decorator: one click option per field of the dataclass `cls` that has a help text, in field order, with the
    field's default, type, range (min, min_open) and choices; a bool is a flag (--no-NAME when it defaults to True)."""
    hints = typing.get_type_hints(cls)

    def option(f: dataclasses.Field) -> Callable:
        rules, flag = f.metadata, "--" + f.name.replace("_", "-")
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        if kind is bool:
            return click.option(f"--no-{flag[2:]}" if f.default else flag, f.name, is_flag=True,
                                flag_value=not f.default, default=f.default, help=rules["help"])
        if "choices" in rules:
            ptype = click.Choice(rules["choices"])
        elif rules.get("path") == "dir":
            ptype = click.Path(file_okay=False)
        elif kind in (int, float) and "min" in rules:
            ptype = (click.IntRange if kind is int else click.FloatRange)(min=rules["min"],
                                                                          min_open=rules.get("min_open", False))
        else:
            ptype = kind
        return click.option(flag, f.name, type=ptype, default=f.default, show_default=f.default is not None,
                            help=rules["help"])

    def decorate(command: Callable) -> Callable:
        for f in reversed([f for f in dataclasses.fields(cls) if f.metadata.get("help")]):
            command = option(f)(command)
        return command

    return decorate


@main.command()
@click.option("--model", "which", type=click.Choice([*LINEARS, "both"]), default="both", show_default=True,
              help="BitNet, its full-precision twin, or both one after the other.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="[default: runs/PRESET]")
@config_options(TrainConfig)
def train(which, **kw) -> None:
    """Train on WikiText-2; writes OUT/report.json (OUT/bitnet and OUT/fp with --model both)."""
    if kw["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda but no CUDA GPU is available; use --device cpu")
    cfg = TrainConfig(**kw)
    reports = train_pair(cfg) if which == "both" else {which: train_one(dataclasses.replace(cfg, linear=which))}
    last = list(reports.values())[-1]
    if last["interrupted"]:
        click.echo(f"interrupted: checkpoint saved in {last['train_config']['out']}/checkpoints; continue with "
                   "--resume", err=True)
        sys.exit(130)
    if which == "both":
        click.echo(side_by_side(reports))
    click.echo(f"report: {cfg.out}/" + ("{bitnet,fp}/report.json" if which == "both" else "report.json"))


@main.command(name="eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="WikiText-2 folder.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
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
