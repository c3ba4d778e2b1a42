"""What WikiText-2 v1 is: where it is published, how its published rows become the text files, and how a split is
recognized by its content whatever the order of its articles.

The one thing a test on this machine cannot confirm is the Hugging Face copy itself: the dataset `Salesforce/wikitext`
publishes each split as one parquet file with a single column `text`, one row per line of the original
`wiki.*.tokens` file, where a non-empty row keeps its trailing newline and a blank line (" " in the original) is an
empty string. `HF_FILES` and `rows_to_text` are that knowledge, in one place; if the hub ever changed either, the
fingerprint check below rejects the result with a message instead of training on something else.

A split is recognized by an order-independent fingerprint: its line count, its word count (words plus one `<eos>`
per line, the perplexity denominator) and the sha256 of its lines sorted bytewise. The copy in ../shared/data has
the official train lines in another article order, and both pass. valid and test are byte-identical to the official
files and are also known by their exact sha256. The test split's sorted-lines hash was never computed here (no copy
of it on this machine), so test is recognized by its exact sha256 alone.

This module is a leaf (no bitnet_fast imports): data.py and download.py turn its answers into DataErrors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

SPLITS = ("train", "valid", "test")
HF_REPO = "Salesforce/wikitext"
HF_REVISION = "main"  # the content check, not a commit pin, decides whether what arrives is WikiText-2 v1
HF_FILES = {
    "train": "wikitext-2-v1/train-00000-of-00001.parquet",
    "valid": "wikitext-2-v1/validation-00000-of-00001.parquet",
    "test": "wikitext-2-v1/test-00000-of-00001.parquet",
}
BLANK_LINE = " \n"  # how the original files write a blank line; the parquet rows have "" for it


@dataclass(frozen=True)
class Fingerprint:
    """The content of one split, independent of line order (see the module docstring)."""

    lines: int
    words: int  # words + one <eos> per line
    sorted_sha256: str | None  # sha256 of the lines sorted bytewise, each ending in "\n"; None: not known
    sha256: str | None = None  # exact sha256 of the file as read (only meaningful for a known byte order)


KNOWN: dict[str, Fingerprint] = {
    "train": Fingerprint(36_718, 2_088_628, "ceb07e5c60b8443f5bac85fae2607a570f30cce603b18b5ea2bcac566a35ab50"),
    "valid": Fingerprint(3_760, 217_646, "53b0620ab6e51b740fc43c845024f14db28dd94c3dc44bb98b54387891590312"),
    "test": Fingerprint(4_358, 245_569, None),
}
EXACT_SHA256: dict[str, frozenset[str]] = {  # byte orders known to be WikiText-2 v1
    "train": frozenset({"728c77e87e176af4730f9a80fc6008bcaff421a7202c1c048877c0eec3685f89"}),  # ../shared's order
    "valid": frozenset({"f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"}),  # the official file
    "test": frozenset({"d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"}),  # the official file
}


def rows_to_text(rows: Iterable[str | None]) -> str:
    """The text of a `wiki.*.tokens` file from the `text` column of the hub's parquet rows (module docstring)."""
    parts = []
    for i, row in enumerate(rows):
        if not row:
            parts.append(BLANK_LINE)
        elif row.endswith("\n"):
            parts.append(row)
        else:
            raise ValueError(f"row {i} of the parquet file has no trailing newline ({row[:40]!r}...): not the "
                             "WikiText layout this code knows (one row per line, non-empty rows ending in \\n)")
    return "".join(parts)


def fingerprint(data: bytes) -> Fingerprint:
    """The Fingerprint of a file's bytes (a missing final newline counts as present)."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return Fingerprint(
        lines=len(lines),
        words=sum(len(line.split()) + 1 for line in lines),
        sorted_sha256=hashlib.sha256(b"".join(line + b"\n" for line in sorted(lines))).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def mismatch(split: str, data: bytes) -> str | None:
    """None when `data` is WikiText-2 v1's `split` (in any line order where its sorted hash is known), else a
    sentence saying how it differs."""
    if split not in KNOWN:
        raise ValueError(f"split={split!r}; use one of {SPLITS}")
    want, got = KNOWN[split], fingerprint(data)
    if got.sha256 in EXACT_SHA256[split]:
        return None
    if (got.lines, got.words) != (want.lines, want.words):
        return (f"it has {got.lines:,} lines and {got.words:,} words (+1 <eos> per line), WikiText-2 v1 {split} has "
                f"{want.lines:,} and {want.words:,}")
    if want.sorted_sha256 is None:
        return (f"its line and word counts match but its sha256 is {got.sha256}; WikiText-2 v1 {split} is "
                f"{' or '.join(sorted(EXACT_SHA256[split]))}")
    if got.sorted_sha256 != want.sorted_sha256:
        return (f"its line and word counts match but its lines differ (sha256 of the sorted lines {got.sorted_sha256}"
                f", want {want.sorted_sha256})")
    return None
