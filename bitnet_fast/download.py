"""Fetching WikiText-2 v1 from the Hugging Face hub when it is not on this machine.

`huggingface_hub.hf_hub_download` does the transfer, as users of this ecosystem expect: its cache
(`$HF_HUB_CACHE`, else ~/.cache/huggingface/hub), `$HF_ENDPOINT` (a mirror), `$HF_HUB_OFFLINE`, resuming a
dropped connection with a Range request, and a download written to a temporary file that is renamed into the
cache only when it has the announced size. On top of that this module

- checks each parquet file against the sha256 the server announced for it (its ETag names the blob), since
  `huggingface_hub` checks only the size: a corrupt blob is removed so that the next run downloads it afresh;
- turns the rows into the original text file (wikitext.rows_to_text) and checks its content (wikitext.mismatch);
- writes `train.txt` / `valid.txt` / `test.txt` atomically into the default data dir, where `find_wikitext`
  looks when neither --data-dir nor $BITNET_FAST_DATA is given.

Any failure is a DataError saying what failed, from where, and what to do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .data import DataError, find_wikitext, sha256_file
from .plumbing import atomic_write, cache_root
from .wikitext import HF_FILES, HF_REPO, HF_REVISION, SPLITS, mismatch, rows_to_text

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "on", "yes", "true"}


def default_dest() -> Path:
    """Where downloads go: the default data dir's wikitext-2 folder (cache_root()/data/wikitext-2)."""
    return cache_root() / "data" / "wikitext-2"


def hub_offline() -> bool:
    """$HF_HUB_OFFLINE (or $TRANSFORMERS_OFFLINE) as huggingface_hub reads it, but read now, not at import."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().lower() in _TRUE


def endpoint() -> str:
    """The hub the files come from: $HF_ENDPOINT, else https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def find_or_fetch(data_dir: str | os.PathLike | None = None, splits: Sequence[str] = ("train", "valid"),
                  offline: bool = False, echo: Callable[[str], None] = print) -> Path:
    """The WikiText-2 folder `find_wikitext` finds, holding `splits`. When nothing is found and the user named no
    folder (no --data-dir, no $BITNET_FAST_DATA), the missing splits are downloaded into the default data dir,
    unless `offline` or $HF_HUB_OFFLINE, which keep today's "not found" error."""
    chose = data_dir is not None or bool(os.environ.get("BITNET_FAST_DATA"))
    no_net = offline or hub_offline()
    try:
        root = find_wikitext(data_dir)
    except DataError as e:
        if chose or no_net:
            why = " (offline: --offline or HF_HUB_OFFLINE is set, so nothing is downloaded)" if no_net else ""
            raise DataError(f"{e}{why}") from None
    else:
        if chose or no_net or root != default_dest() or all((root / f"{s}.txt").is_file() for s in splits):
            return root  # a missing split is reported by data.wikitext_split
    return fetch_wikitext(default_dest(), splits, echo=echo)


def fetch_wikitext(dest: str | os.PathLike, splits: Sequence[str] = SPLITS,
                   echo: Callable[[str], None] = print) -> Path:
    """Download `splits` of WikiText-2 v1 into `dest` as {split}.txt (those already there and correct are kept);
    returns `dest`. DataError on any failure, with nothing half-written left in `dest`."""
    dest = Path(dest)
    if hub_offline():
        raise DataError("HF_HUB_OFFLINE is set, so WikiText-2 cannot be downloaded; unset it, or put the files in a "
                        "folder and pass it with --data-dir")
    for split in splits:
        if split not in HF_FILES:
            raise ValueError(f"split={split!r}; use one of {SPLITS}")
        target = dest / f"{split}.txt"
        if target.is_file() and mismatch(split, target.read_bytes()) is None:
            echo(f"WikiText-2 {split}: {target} is already there")
            continue
        echo(f"downloading WikiText-2 v1 {split}: {HF_FILES[split]} of dataset {HF_REPO} from {endpoint()} "
             f"(Hugging Face cache), written as {target}")
        path = _download(HF_FILES[split])
        try:
            data = rows_to_text(_read_rows(path)).encode("utf-8")
            problem = mismatch(split, data)
        except ValueError as e:
            problem = str(e)
        if problem is not None:
            _evict(path)
            raise DataError(f"{HF_FILES[split]} from {endpoint()} is not WikiText-2 v1 {split}: {problem}; removed it "
                            "from the Hugging Face cache. Check HF_ENDPOINT, or get the files yourself and pass "
                            "--data-dir")
        atomic_write(target, data)
    return dest


def _download(filename: str) -> Path:
    """hf_hub_download of one file of the dataset, checked against the sha256 the server announced."""
    from huggingface_hub import hf_hub_download

    url = f"{endpoint()}/datasets/{HF_REPO}/resolve/{HF_REVISION}/{filename}"
    try:
        path = Path(hf_hub_download(HF_REPO, filename, repo_type="dataset", revision=HF_REVISION,
                                    endpoint=endpoint(), cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except Exception as e:  # huggingface_hub and httpx raise many types; all mean the same thing here
        raise DataError(f"downloading {url} failed: {_reason(e)}. Check the connection (and HF_ENDPOINT), then run "
                        "again (a dropped download resumes), or get the files yourself and pass --data-dir") from None
    blob = path.resolve()
    if blob.parent.name == "blobs" and _SHA256.fullmatch(blob.name):  # LFS files: the ETag is the content's sha256
        got = sha256_file(blob)
        if got != blob.name:
            _evict(path)
            raise DataError(f"{url} arrived corrupt (sha256 {got}, the server announced {blob.name}); removed it "
                            "from the Hugging Face cache: run again to download it afresh")
    return path


def _evict(path: Path) -> None:
    """Remove a downloaded file from the Hugging Face cache (its blob and the snapshot's link to it), so that the
    next run downloads it again instead of reusing it."""
    path.resolve().unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _read_rows(path: Path) -> list[str | None]:
    """The `text` column of a parquet file; ValueError when it is not one."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, KeyError, ...
        raise ValueError(f"not a readable parquet file with a `text` column ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    """An exception and its causes in one line (huggingface_hub wraps an HTTP 500 in a 'not in cache' error)."""
    parts = []
    while e is not None and len(parts) < 3:
        msg = " ".join(str(e).split())
        parts.append(f"{type(e).__name__}: {msg[:300]}" if msg else type(e).__name__)
        e = e.__cause__
    return " <- ".join(parts)
