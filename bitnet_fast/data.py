"""Text -> tokenizer -> checksummed token shards -> (B, T) batches. WikiText-2 goes through the same path.

Every line of text becomes its tokens followed by one `<eos>` (the WikiText convention), so the number of
"words" in a split is `sum(len(line.split()) + 1)` whatever the tokenizer, and word-level perplexity is
exp(total NLL / words). Each split's stream starts with an extra `<eos>` so every real token is predicted.

Shard file = 64-byte header + little-endian tokens:
    magic b"BNFTOKS\\0" | version u32 | dtype code u32 (1=uint16, 2=uint32) | count u64 | sha256 of payload (32 B)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .plumbing import UserError, atomic_path, atomic_write, cache_root, write_json
from .wikitext import mismatch

EOS, UNK = "<eos>", "<unk>"
WORD_START = "\u2581"  # "▁": BPE's word-start marker
TOKENIZER_RECIPE = 2  # part of the cache key: bumped when train_tokenizer changes (2: deterministic BPE)
TOKENIZERS = ("bpe", "word")
SHARD_MAGIC, SHARD_VERSION = b"BNFTOKS\0", 1
_HEADER = struct.Struct("<8sIIQ32s")  # 56 bytes, padded to 64
HEADER_BYTES = 64
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
WIKITEXT_REQUIRED = ("train.txt", "valid.txt")  # test.txt is optional
WIKITEXT_URL = "https://huggingface.co/datasets/Salesforce/wikitext (config wikitext-2-v1)"


class DataError(UserError):
    """Missing, corrupt or unusable data; the message says how to fix it."""


# ------------------------------------------------------------------------------------------------ locations
def find_wikitext(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding WikiText-2 train.txt/valid.txt: --data-dir, then $BITNET_FAST_DATA, then
    cache_root()/data (which honours $BITNET_FAST_CACHE)."""
    if data_dir is not None:
        root, origin = Path(data_dir), "--data-dir"
    elif os.environ.get("BITNET_FAST_DATA"):
        root, origin = Path(os.environ["BITNET_FAST_DATA"]), "$BITNET_FAST_DATA"
    else:
        root, origin = cache_root() / "data", "the default data dir"
    for cand in (root, root / "wikitext-2"):
        if all((cand / name).is_file() for name in WIKITEXT_REQUIRED):
            return cand
    raise DataError(
        f"WikiText-2 not found in {root} ({origin}): need train.txt and valid.txt there or in {root}/wikitext-2/. "
        f"Get WikiText-2 v1 ({WIKITEXT_URL}), save wiki.train.tokens / wiki.valid.tokens [/ wiki.test.tokens] as "
        f"train.txt / valid.txt [/ test.txt] in one folder, and pass it with --data-dir or BITNET_FAST_DATA "
        f"(without either, `bitnet-fast data download` fetches it into the default data dir)."
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wikitext_split(root: Path, split: str) -> Path:
    """Path of `split` ("train" | "valid" | "test") in root, recognized as WikiText-2 v1 by its content in any line
    order (wikitext.mismatch)."""
    path = root / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path} not found; the {split} split needs {split}.txt in {root}")
    problem = mismatch(split, path.read_bytes())
    if problem is not None:
        raise DataError(f"{path} is not the WikiText-2 v1 {split} split: {problem}. Re-download it "
                        "(`bitnet-fast data download`) or use `bitnet-fast prepare` for other text")
    return path


def read_lines(paths: Sequence[str | os.PathLike], max_lines: int | None = None) -> list[str]:
    """Lines of the text files (stripped), optionally only the first `max_lines` of each file."""
    lines: list[str] = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                file_lines = [line.strip() for line in f]
        except UnicodeDecodeError as e:
            raise DataError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None
        lines += file_lines[:max_lines] if max_lines is not None else file_lines
    return lines


def count_words(lines: Sequence[str]) -> int:
    """Words including one <eos> per line: the denominator of word-level perplexity."""
    return sum(len(line.split()) + 1 for line in lines)


# ------------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(lines: Sequence[str], kind: str = "bpe", vocab_size: int = 8192):
    """A `tokenizers.Tokenizer` trained on `lines`: "bpe" (subwords, whitespace-split) or "word" (one id per word).

    The same lines and settings give the same tokenizer.json in any process. BPE marks a word's start with "▁"
    (the SentencePiece convention) rather than an end-of-word suffix: the pinned `tokenizers` assigns ids to
    suffixed symbols ("t</w>") in hash-map order, which made merges and ids differ from process to process; with
    the marker every initial symbol is a plain character, which the trainer orders deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS, UNK]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        marker = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), marker])
        tok.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
    elif kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="\0", cleanup=False)  # joins words with spaces
    else:
        raise ValueError(f"tokenizer kind={kind!r}; use one of {TOKENIZERS}")
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type on bad JSON
        raise DataError(f"cannot read tokenizer {path}: {e}") from e


def encode_lines(tok, lines: Sequence[str], leading_eos: bool = True) -> np.ndarray:
    """Token ids of `lines`, each line followed by <eos> (and the stream led by one <eos>), as int64."""
    eos = tok.token_to_id(EOS)
    out: list[int] = [eos] if leading_eos else []
    for enc in tok.encode_batch(list(lines), add_special_tokens=False):
        out += enc.ids
        out.append(eos)
    return np.asarray(out, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ shards
def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write tokens atomically (plumbing.atomic_path) with a header holding count and sha256."""
    code = 1 if tokens.size == 0 or int(tokens.max()) < 2**16 else 2
    payload = np.ascontiguousarray(tokens, dtype=_DTYPES[code]).tobytes()
    header = _HEADER.pack(SHARD_MAGIC, SHARD_VERSION, code, tokens.size, hashlib.sha256(payload).digest())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(payload)


def read_shard(path: str | os.PathLike, verify: bool = True) -> np.memmap:
    """Memory-map a shard; raises DataError when it is truncated, of another format or fails its checksum."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e}") from e
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path} is truncated (no complete header); re-run `bitnet-fast prepare`")
    magic, version, code, count, digest = _HEADER.unpack(raw[: _HEADER.size])
    if magic != SHARD_MAGIC or version != SHARD_VERSION or code not in _DTYPES:
        raise DataError(f"{path} is not a bitnet-fast token shard (v{SHARD_VERSION}); re-run `bitnet-fast prepare`")
    dtype = _DTYPES[code]
    if size != HEADER_BYTES + count * dtype.itemsize:
        raise DataError(f"{path} is truncated or padded: {size} bytes for {count} tokens; re-run `bitnet-fast prepare`")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
    if verify and hashlib.sha256(tokens.tobytes()).digest() != digest:
        raise DataError(f"{path} fails its sha256 checksum (corrupt); re-run `bitnet-fast prepare`")
    return tokens


def prepare(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer=None,
    kind: str = "bpe",
    vocab_size: int = 8192,
    shard_tokens: int = 1 << 24,
    max_lines: int | None = None,
) -> dict:
    """Tokenize text files into `out_dir`: tokenizer.json, <stem>-NNNNN.bin shards and manifest.json.

    Without `tokenizer`, one is trained on all inputs. Returns the manifest (files, tokens and words per input).
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    missing = [str(p) for p in inputs if not Path(p).is_file()]
    if missing:
        raise DataError(f"input file(s) not found: {', '.join(missing)}")
    stems: dict[str, str] = {}
    for p in inputs:
        if Path(p).stem in stems:
            raise DataError(f"inputs {stems[Path(p).stem]} and {p} would both be split {Path(p).stem!r} (splits are "
                            "named after the file name); rename one")
        stems[Path(p).stem] = str(p)
    per_file = {Path(p).stem: read_lines([p], max_lines) for p in inputs}
    if tokenizer is None:
        tokenizer = train_tokenizer([ln for lines in per_file.values() for ln in lines], kind, vocab_size)
    return write_splits(per_file, out_dir, tokenizer, shard_tokens)


def write_splits(splits: dict[str, Sequence[str]], out_dir: str | os.PathLike, tokenizer,
                 shard_tokens: int = 1 << 24) -> dict:
    """Write each split's lines (name -> lines) tokenized into `out_dir`: tokenizer.json, <name>-NNNNN.bin shards
    and manifest.json (written last). Returns the manifest."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if tokenizer.token_to_id(EOS) is None:
        raise DataError(f"the tokenizer has no {EOS} token, which ends every line; add it as a special token or let "
                        "`prepare` train one (drop --tokenizer)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    manifest = {"version": SHARD_VERSION, "vocab_size": tokenizer.get_vocab_size(), "splits": {}}
    for stem, lines in splits.items():
        tokens = encode_lines(tokenizer, lines)
        files = []
        for i, start in enumerate(range(0, max(tokens.size, 1), shard_tokens)):
            name = f"{stem}-{i:05d}.bin"
            write_shard(out / name, tokens[start : start + shard_tokens])
            files.append(name)
        manifest["splits"][stem] = {"files": files, "tokens": int(tokens.size), "words": count_words(lines)}
    write_json(out / "manifest.json", manifest)
    return manifest


@dataclass
class Split:
    tokens: np.ndarray  # (N,) token ids, starting with <eos>
    words: int  # words incl. one <eos> per line


@dataclass
class Corpus:
    """A prepared corpus: its tokenizer, directory and splits loaded from verified shards."""

    dir: Path
    tokenizer: object
    splits: dict[str, Split]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def load_prepared(out_dir: str | os.PathLike) -> Corpus:
    """Load a `prepare` output folder, verifying every shard."""
    out = Path(out_dir)
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        splits = {
            name: Split(np.concatenate([read_shard(out / f) for f in s["files"]]).astype(np.int64), int(s["words"]))
            for name, s in manifest["splits"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{out}/manifest.json unreadable or incomplete ({type(e).__name__}: {e}); re-run "
                        "`bitnet-fast prepare`") from None
    return Corpus(out, load_tokenizer(out / "tokenizer.json"), splits)


def wikitext(
    data_dir: str | os.PathLike | None = None,
    kind: str = "bpe",
    vocab_size: int = 8192,
    max_lines: int | None = None,
    splits: Sequence[str] = ("train", "valid"),
    tokenizer_json: str | None = None,
) -> Corpus:
    """WikiText-2 tokenized (tokenizer trained on train, or the given one: a resumed run brings its checkpoint's)
    and cached as shards under plumbing.cache_root()."""
    root = find_wikitext(data_dir)
    files = {s: wikitext_split(root, s) for s in splits}
    given = hashlib.sha256(tokenizer_json.encode()).hexdigest() if tokenizer_json is not None else None
    key = hashlib.sha256(json.dumps(
        [kind, vocab_size, max_lines, sorted((s, sha256_file(p)) for s, p in files.items()), TOKENIZER_RECIPE, given]
    ).encode()).hexdigest()[:16]
    out = cache_root() / "wikitext-2" / f"{kind}{vocab_size}-{key}"
    if (out / "manifest.json").is_file():
        try:
            return load_prepared(out)
        except DataError:
            pass  # a corrupt cache is rebuilt below
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
    else:
        tok = train_tokenizer(read_lines([files["train"]], max_lines), kind, vocab_size)
    prepare([files[s] for s in splits], out, tokenizer=tok, max_lines=max_lines)
    return load_prepared(out)


# ------------------------------------------------------------------------------------------------ batches
class Batches:
    """Non-overlapping (B, T) windows of a token stream, shuffled per epoch by (seed, epoch).

    Deterministic for a seed; rank r of world_size takes every world_size-th window so all ranks get the
    same number of batches. `epoch(e, start=k)` resumes at batch k.
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.B, self.T, self.seed, self.rank, self.world = batch_size, seq_len, seed, rank, world_size
        self.n_windows = (len(self.tokens) - 1) // seq_len
        per_rank = self.n_windows // world_size
        self.steps_per_epoch = per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.tokens)} tokens give no full batch of {batch_size} x {seq_len} per rank; "
                f"lower --batch-size or --seq-len"
            )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_windows, generator=g)[self.rank :: self.world]
        for step in range(start, self.steps_per_epoch):
            starts = order[step * self.B : (step + 1) * self.B] * self.T  # (B,)
            idx = starts[:, None] + torch.arange(self.T + 1)  # (B, T + 1)
            chunk = self.tokens[idx]
            yield chunk[:, :-1], chunk[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every token after the first predicted exactly once: consecutive windows, the last one shorter."""
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    n = len(t) - 1
    full = n // seq_len
    for b in range(0, full, batch_size):
        rows = range(b, min(b + batch_size, full))
        x = torch.stack([t[r * seq_len : (r + 1) * seq_len] for r in rows])
        y = torch.stack([t[r * seq_len + 1 : (r + 1) * seq_len + 1] for r in rows])
        yield x, y
    if n % seq_len:
        yield t[full * seq_len : n][None], t[full * seq_len + 1 :][None]
