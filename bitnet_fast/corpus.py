"""Any text as a training corpus: `bitnet-fast prepare` splits it into train and valid, and `train --data DIR`,
`eval` and `generate` use the folder it writes, with the tokenizer stored there.

The valid split is either explicit files (`--valid`) or the last `valid_fraction` of the input lines (contiguous,
so that a held-out passage is not also half in train; deterministic). The tokenizer is trained on the train split
only. Lines are counted as in data.py: each line is its words plus one `<eos>`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .data import Corpus, DataError, load_prepared, read_lines, train_tokenizer, write_splits

TRAIN_SPLITS = ("train", "valid")


def prepare_split(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    valid: Sequence[str | os.PathLike] = (),
    valid_fraction: float = 0.05,
    tokenizer=None,
    kind: str = "bpe",
    vocab_size: int = 8192,
    shard_tokens: int = 1 << 24,
    test: Sequence[str | os.PathLike] = (),
) -> dict:
    """Tokenize `inputs` (train) and `valid` files, or the held-out last `valid_fraction` of the inputs' lines, into
    `out_dir` as the splits "train" and "valid", and the optional `test` files as "test" (reported after training,
    never trained or tuned on). Without `tokenizer` one is trained on the train lines. Returns the manifest (tokens
    and words per split)."""
    missing = [str(p) for p in (*inputs, *valid, *test) if not Path(p).is_file()]
    if missing:
        raise DataError(f"input file(s) not found: {', '.join(missing)}")
    if not inputs:
        raise ValueError("no input files: give at least one text file to train on")
    lines = read_lines(inputs)
    if valid:
        train, held_out = lines, read_lines(valid)
    else:
        if not 0 < valid_fraction < 1:
            raise ValueError(f"valid_fraction={valid_fraction} must be in (0, 1); or give --valid files")
        n_valid = max(1, round(len(lines) * valid_fraction))
        if len(lines) - n_valid < 1:
            raise DataError(f"{len(lines)} input line(s) are too few to hold out {valid_fraction:.0%} for valid; "
                            "give more text or --valid files")
        train, held_out = lines[:-n_valid], lines[-n_valid:]
    if not any(line.split() for line in train):
        raise DataError("the train split has no words; give text files with content")
    if tokenizer is None:
        tokenizer = train_tokenizer(train, kind, vocab_size)
    splits = {"train": train, "valid": held_out, **({"test": read_lines(test)} if test else {})}
    return write_splits(splits, out_dir, tokenizer, shard_tokens)


def load_corpus(data: str | os.PathLike, splits: Sequence[str] = TRAIN_SPLITS) -> Corpus:
    """A folder written by `bitnet-fast prepare`, verified, holding `splits`; DataError says how to make one."""
    path = Path(data)
    if not (path / "manifest.json").is_file():
        raise DataError(f"--data {path}: no manifest.json there; make the folder with "
                        f"`bitnet-fast prepare TEXT_FILES --out {path}`")
    corpus = load_prepared(path)
    absent = [s for s in splits if s not in corpus.splits]
    if absent:
        raise DataError(f"--data {path} has the splits {', '.join(sorted(corpus.splits))} but not "
                        f"{', '.join(absent)}; re-run `bitnet-fast prepare` (it writes train and valid)")
    return corpus


def same_tokenizer(a, b) -> bool:
    """Whether two `tokenizers.Tokenizer`s map text to the same ids (same serialized model, normalizers, ...)."""
    return a.to_str() == b.to_str()
