"""`bitnet-fast`: the command line. Thin on purpose: each command parses its flags, calls a library function and
prints. The options of `train` are built from the fields of `TrainConfig`, where their defaults live.

Errors users can fix (bad flags, missing data, corrupt checkpoints or shards) print one line on stderr and
exit non-zero (2 for usage errors, 1 otherwise, 130 after Ctrl-C, 143 after SIGTERM); no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
import warnings
from collections.abc import Callable

import click
from click.core import ParameterSource

from .config import DEVICES, TrainConfig
from .data import TOKENIZERS
from .distributed import is_main
from .generate import ENGINES
from .model import LINEARS, PRESETS
from .plumbing import UserError
from .recipe import PER_MODEL_FIELDS
from .train import side_by_side, train_pair
from .train import train as train_one
from .wikitext import SPLITS as WIKITEXT_SPLITS


class _Group(click.Group):
    """Turns library errors (UserError, ValueError, OSError, MemoryError) into one-line ClickExceptions; prints
    warnings as one `warning: ...` line on stderr."""

    def invoke(self, ctx: click.Context):
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except (UserError, ValueError, OSError) as e:
            raise click.ClickException(" ".join(str(e).split())) from None
        except MemoryError:
            raise click.ClickException("out of memory; use a smaller --batch-size (or a smaller model)") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Callback of every float option: inf and nan pass click's FloatRange but are never meant."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


@click.group(cls=_Group)
@click.version_option(package_name="bitnet-fast")
def main() -> None:
    """bitnet-fast: fast BitNet b1.58 (ternary-weight) training and inference."""


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder for shards.")
@click.option("--valid", "valid_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file(s) for the valid split (repeatable) [default: hold out the end of INPUTS].")
@click.option("--valid-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Fraction of the INPUTS' lines (the last) held out as valid without --valid.")
@click.option("--test", "test_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file(s) for an optional test split (repeatable), reported after training.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False),
              help="Reuse this tokenizer.json instead of training one on the train split.")
@click.option("--kind", type=click.Choice(TOKENIZERS), default="bpe", show_default=True)
@click.option("--vocab-size", type=click.IntRange(min=4), default=8192, show_default=True)
@click.option("--shard-tokens", type=click.IntRange(min=1), default=1 << 24, show_default=True)
def prepare(inputs, out_dir, valid_files, valid_fraction, test_files, tokenizer_path, kind, vocab_size,
            shard_tokens) -> None:
    """Tokenize text files INPUTS into train/valid (and --test) splits of checksummed token shards in --out (for
    train --data)."""
    from .corpus import prepare_split
    from .data import load_tokenizer

    tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
    manifest = prepare_split(inputs, out_dir, valid_files, valid_fraction, tok, kind, vocab_size, shard_tokens,
                             test_files)
    for name, s in manifest["splits"].items():
        click.echo(f"{name}: {s['tokens']:,} tokens ({s['words']:,} words) in {len(s['files'])} shard(s)")
    click.echo(f"vocab {manifest['vocab_size']}; wrote {out_dir}/manifest.json; train on it with "
               f"`bitnet-fast train --data {out_dir}`")


@main.group(name="data")
def data_() -> None:
    """Datasets: download WikiText-2."""


@data_.command(name="download")
@click.argument("dataset", type=click.Choice(["wikitext-2"]), default="wikitext-2")
@click.option("--split", "splits", multiple=True, type=click.Choice(WIKITEXT_SPLITS),
              help="Only these splits (repeatable) [default: all three].")
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="Folder for train.txt/valid.txt/test.txt [default: the default data dir].")
def download(dataset, splits, dest) -> None:
    """Fetch DATASET (WikiText-2 v1 from the Hugging Face hub, $HF_ENDPOINT honoured) as text files."""
    from .download import default_dest, fetch_wikitext

    out = fetch_wikitext(dest or default_dest(), splits or WIKITEXT_SPLITS, echo=lambda m: click.echo(m, err=True))
    click.echo(f"{dataset}: {', '.join(splits or WIKITEXT_SPLITS)} in {out}")


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
        elif kind in (int, float) and ("min" in rules or "max" in rules):
            ptype = (click.IntRange if kind is int else click.FloatRange)(
                min=rules.get("min"), max=rules.get("max"), min_open=rules.get("min_open", False))
        else:
            ptype = kind
        return click.option(flag, f.name, type=ptype, default=f.default, show_default=f.default is not None,
                            help=rules["help"], callback=_finite if kind is float else None)

    def decorate(command: Callable) -> Callable:
        for f in reversed([f for f in dataclasses.fields(cls) if f.metadata.get("help")]):
            command = option(f)(command)
        return command

    return decorate


@main.command()
@click.option("--model", "which", type=click.Choice([*LINEARS, "both"]), default="both", show_default=True,
              help="BitNet, its full-precision twin, or both, trained in turn step by step (tokens/s measured under "
                   "the same conditions).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="[default: runs/PRESET]")
@click.option("--batch-from", type=click.Path(dir_okay=False), default=None,
              help="Take the per-rank --batch-size and --grad-accum, --seq-len and --ckpt-every from a "
                   "`bitnet-fast calibrate --json` file, planned for this run's world size; those flags given on "
                   "the command line win over the file.")
@config_options(TrainConfig)
def train(which, batch_from, **kw) -> None:
    """Train on WikiText-2 (or --data); writes OUT/report.json (OUT/bitnet and OUT/fp with --model both).

    With --resume the run continues with the settings and tokenizer of its checkpoint; a flag given here that
    conflicts with them is an error (defaults never conflict)."""
    if kw["data"] is not None and kw["data_dir"] is not None:
        raise click.UsageError("--data (a prepared folder) and --data-dir (the WikiText-2 folder) exclude each "
                               "other; use one")
    _need_cuda(kw["device"])
    stray = [f"--{n}-{m}" for n in PER_MODEL_FIELDS for m in LINEARS if which not in ("both", m)
             and kw[f"{n}_{m}"] is not None]
    if stray:
        raise click.UsageError(f"{', '.join(stray)} set(s) a model that --model {which} does not train; use "
                               f"{', '.join('--' + f.split('-')[2] for f in stray)} for it (or --model both)")
    ctx = click.get_current_context()
    explicit = {n for n in kw if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT,
                                                                      ParameterSource.DEFAULT_MAP)}
    if ctx.get_parameter_source("which") not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
        explicit.add("linear")
    if batch_from is not None:
        _batch_from(batch_from, which, kw, explicit)
    cfg = TrainConfig(**kw)
    reports = (train_pair(cfg, explicit) if which == "both"
               else {which: train_one(dataclasses.replace(cfg, linear=which), explicit=explicit)})
    if not is_main():  # under torchrun rank 0 alone reports
        return
    last = list(reports.values())[-1]
    if last["interrupted"]:
        click.echo(f"interrupted ({last['stop_signal'] or 'by another rank'}): checkpoint saved in "
                   f"{last['train_config']['out']}/checkpoints; continue with --resume", err=True)
        sys.exit(143 if last["stop_signal"] == "SIGTERM" else 130)  # 128 + the signal, as the shell reports it
    if which == "both":
        click.echo(side_by_side(reports))
    click.echo(f"report: {cfg.out}/" + ("{bitnet,fp}/report.json" if which == "both" else "report.json"))


def _batch_from(path: str, which: str, kw: dict, explicit: set[str]) -> None:
    """Fill the sizing flags not given on the command line from calibration file `path` (sizing.from_file) and
    count them as given (a --resume then checks them against the checkpoint); rank 0 prints what it took."""
    from .sizing import from_file

    if which == "both":
        raise click.UsageError("--batch-from sizes one model; add --model bitnet or --model fp")
    world = int(os.environ.get("WORLD_SIZE", "1")) if kw["distributed"] else 1
    got = from_file(path, kw["preset"], which, kw["seq_len"] if "seq_len" in explicit else None, world)
    plan = got["plan"]
    taken = {"seq_len": got["seq_len"], "batch_size": plan["batch_size"], "grad_accum": plan["grad_accum"]}
    if plan["steps_per_interval"] is not None:
        taken["ckpt_every"] = plan["steps_per_interval"]
    taken = {k: v for k, v in taken.items() if k not in explicit}
    kw.update(taken)
    explicit |= set(taken)
    if os.environ.get("RANK", "0") != "0":
        return
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in taken.items()) or "nothing (all given)"
    click.echo(f"--batch-from {path}: took {flags}; planned at {world} rank(s) from "
               f"{got['measured']['tokens_per_sec']:.0f} tokens/s per rank: {plan['global_batch']} sequences and "
               f"~{plan['predicted_step_seconds']:.2f} s of compute per step", err=True)
    import torch

    if got["threads"] is not None and got["threads"] != torch.get_num_threads():
        click.echo(f"warning: {path} was measured with {got['threads']} thread(s), this rank has "
                   f"{torch.get_num_threads()}: the step time will differ", err=True)


@main.command(name="eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="WikiText-2 folder.")
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="A prepared folder [default: the one the checkpoint was trained on with train --data].")
@click.option("--offline", is_flag=True, help="Never download WikiText-2; fail when it is not found.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(checkpoint, split, data_dir, data, offline, batch_size, device, as_json) -> None:
    """Token- and word-level perplexity of a training CHECKPOINT on a split of WikiText-2 or of a prepared folder."""
    from .evaluate import evaluate_checkpoint

    if data is not None and data_dir is not None:
        raise click.UsageError("--data (a prepared folder) and --data-dir (the WikiText-2 folder) exclude each other")
    _need_cuda(device)
    r = evaluate_checkpoint(checkpoint, split, data_dir, batch_size, device, data, offline)
    if as_json:
        click.echo(json.dumps(r, indent=1))
    else:
        click.echo(f"{r['model']} step {r['step']} on {split}: ppl {r['ppl']:.3f} (token, {r['tokens']:,} tokens), "
                   f"word ppl {r['word_ppl']:.3f} ({r['words']:,} words)")


@main.command(name="generate")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--prompt", required=True, help="Text to continue (a newline in it is a line break, as in training).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True, help="0: greedy.")
@click.option("--top-k", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
              help="decoder: the packed Numba decoder (BitNet, CPU); torch: LM with its KV cache.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
def generate_(checkpoint, prompt, max_new_tokens, temperature, top_k, seed, engine, device) -> None:
    """Continue --prompt with the model of a training CHECKPOINT (or a decoder file from `export --format decoder`),
    streaming the text; then tokens/s on stderr."""
    from .generate import Generator, Stats

    if not prompt.strip():
        raise click.UsageError("--prompt is empty; give some text to continue")
    gen = Generator(checkpoint, device)
    pieces = gen.stream(prompt, max_new_tokens, temperature, top_k, seed, engine,
                        warn=lambda m: click.echo(m, err=True))
    for i, piece in enumerate(pieces):
        if i == 0:  # after the <unk> warning, if any
            click.echo(prompt, nl=False)
        if isinstance(piece, Stats):
            click.echo()
            click.echo(piece.summary(), err=True)
        else:
            click.echo(piece, nl=False)
            sys.stdout.flush()


@main.command(name="export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["tq1", "i2", "decoder"]), default="tq1", show_default=True,
              help="tq1: ~1.6 bits/weight, the smallest file; i2: 2 bits/weight, the CPU compute layout; decoder: "
                   "the CPU decoder's file (i2, int8 head) with the tokenizer, for `generate OUT`, loaded by mmap.")
def export_(checkpoint, out, fmt) -> None:
    """Write the BitNet model of a training CHECKPOINT packed to OUT (safetensors; load with export.load_lm, or
    decoder_file.load_decoder for --format decoder)."""
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .export import save_packed

    ckpt = load_checkpoint(checkpoint)
    linear = ckpt["model_config"].get("linear")
    if linear != "bitnet":
        raise click.ClickException(f"{checkpoint} holds a model with linear={linear!r}; only BitNet checkpoints "
                                   "export packed (train with --model bitnet)")
    if fmt == "decoder":
        from .decode import PackedDecoder
        from .decoder_file import save_decoder
        from .nn import pack_model

        dec = PackedDecoder.from_model(pack_model(model_from_checkpoint(ckpt).eval()))
        path = save_decoder(dec, out, tokenizer=ckpt["tokenizer"])
    else:
        path = save_packed(model_from_checkpoint(ckpt), out, fmt)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {fmt}, step {ckpt['step']})")


@main.command(name="calibrate")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON (progress goes to stderr).")
@click.option("--quick", is_flag=True, help="tiny/small presets, few repeats: under a minute.")
@click.option("--target-seconds", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              callback=_finite, help="Seconds one training micro-batch should take; sizes the recommended batch "
              "(per rank: with --global-batch, grad-accum such micro-batches make one step).")
@click.option("--target-minutes", type=click.FloatRange(min=0, min_open=True), default=None, callback=_finite,
              help="Checkpoint interval to plan for: how many steps fit in it (train --batch-from: --ckpt-every).")
@click.option("--global-batch", type=click.IntRange(min=1), default=None,
              help="Sequences per optimizer step over all ranks to split into per-rank batch x grad-accum.")
@click.option("--world-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ranks the per-rank plan is printed for (train --batch-from plans again for its own).")
@click.option("--preset", "presets", multiple=True, type=click.Choice(sorted(PRESETS)),
              help="Only these presets (repeatable).")
@click.option("--seq-len", type=click.IntRange(min=8), default=None, help="Training sequence length [128; quick 64].")
@click.option("--no-save", is_flag=True, help="Measure only; leave the kernel tuning file alone.")
@click.option("--whole-model/--no-whole-model", default=None,
              help="TinyLlama-shaped PackedDecoder decode/prefill next to llama.cpp (if built) [default: not --quick].")
def calibrate_(as_json, quick, target_seconds, target_minutes, global_batch, world_size, presets, seq_len, no_save,
               whole_model) -> None:
    """Time and tune the kernels on this machine (saved for later runs); tokens/sec and batch sizes per preset.

    Training speed is measured at this process's thread count: run it as one rank will run (torchrun gives each
    rank OMP_NUM_THREADS=1) to size work per rank; `--json > FILE` is what `train --batch-from FILE` reads."""
    from .calibrate import calibrate, format_table

    result = calibrate(quick=quick, target_seconds=target_seconds, presets=presets or None, seq_len=seq_len,
                       save=not no_save, echo=lambda m: click.echo(m, err=True), whole_model=whole_model,
                       world_size=world_size, global_batch=global_batch, target_minutes=target_minutes)
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


def _need_cuda(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda but no CUDA GPU is available; use --device cpu")


if __name__ == "__main__":  # `python -m bitnet_fast.cli` (e.g. under torchrun)
    main()
