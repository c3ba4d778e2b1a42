"""Perplexity of an LM on a token stream: token-level exp(NLL / tokens) and word-level exp(NLL / words).

Word-level perplexity uses the same total NLL over a denominator that does not depend on the tokenizer
(words incl. one <eos> per line), so BPE and word-level models and published WikiText-2 numbers compare.
"""

from __future__ import annotations

import math
import os

import psutil
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .corpus import load_corpus, same_tokenizer
from .data import DataError, Split, count_words, encode_lines, eval_windows, read_lines, wikitext_split
from .download import find_or_fetch
from .plumbing import UserError, fmt

# Bytes per (row, position, vocab entry) an eval batch holds at its peak: the logits (fp32), their float() copy
# and cross_entropy's log-softmax; the activations (width << vocab) fit in the same slack.
_LOGIT_COPIES = 3


def check_eval_memory(n_tokens: int, seq_len: int, batch_size: int, vocab_size: int,
                      device: str | torch.device = "cpu") -> None:
    """Refuse, before anything is allocated, an eval batch whose logits cannot fit in the memory available on
    `device` (the kernel may kill a process that overcommits instead of raising MemoryError)."""
    rows = min(batch_size, max(1, (n_tokens - 1) // seq_len))  # eval_windows never makes more rows than that
    need = rows * seq_len * vocab_size * 4 * _LOGIT_COPIES
    if torch.device(device).type == "cuda":
        have = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        have = psutil.virtual_memory().available
    if need > have:
        fit = max(1, int(have // (seq_len * vocab_size * 4 * _LOGIT_COPIES)))
        raise UserError(f"--batch-size {batch_size} needs about {fmt(need, 'B')} for its logits but {fmt(have, 'B')} "
                        f"is available on {device}; use --batch-size {min(fit, batch_size - 1)} or less")


@torch.no_grad()
def nll_sum(model: torch.nn.Module, split: Split, seq_len: int, batch_size: int = 16,
            device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """(summed NLL, tokens) over the eval windows of `split`; with shard=(rank, world), only batches
    rank, rank + world, ... (the ranks of a distributed run share the work; their sums add up to the whole)."""
    rank, world = shard
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        check_eval_memory(len(split.tokens), seq_len, batch_size, vocab, device)
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    for i, (x, y) in enumerate(eval_windows(split.tokens, seq_len, batch_size)):
        if i % world != rank:
            continue
        logits, _ = model(x.to(device))  # (B, T, V)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum").item()
        n += y.numel()
    model.train(was_training)
    return nll, n


def ppl_from(nll: float, n: int, words: int) -> dict:
    """Token- and word-level perplexity from a summed NLL over n tokens of a split of `words` words."""
    return {"loss": nll / n, "ppl": math.exp(nll / n), "word_ppl": math.exp(nll / words), "tokens": n, "words": words}


def perplexity(
    model: torch.nn.Module, split: Split, seq_len: int, batch_size: int = 16, device: str | torch.device = "cpu"
) -> dict:
    """NLL over every token of `split` after the first, in non-overlapping windows of seq_len."""
    return ppl_from(*nll_sum(model, split, seq_len, batch_size, device), split.words)


def evaluate_checkpoint(
    path: str | os.PathLike,
    split: str = "valid",
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    data: str | os.PathLike | None = None,
    offline: bool = False,
) -> dict:
    """Perplexity of a training checkpoint on a split of WikiText-2 (tokenized with the checkpoint's tokenizer) or of
    a prepared folder (`data`; its shards must come from the checkpoint's tokenizer). Without `data` or `data_dir`,
    a checkpoint trained with `train --data DIR` is evaluated on DIR."""
    from tokenizers import Tokenizer

    if data is not None and data_dir is not None:
        raise ValueError("data and data_dir both given: --data names a prepared folder, --data-dir the WikiText-2 "
                         "folder; use one")
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, device)
    try:
        tok = Tokenizer.from_str(ckpt["tokenizer"])
        seq_len = int(ckpt["train_config"]["seq_len"])
    except Exception as e:  # tokenizers raises its own Exception type on bad JSON
        raise CheckpointError(f"checkpoint {path} has no usable tokenizer or train_config.seq_len ({e})") from None
    data = data if data is not None or data_dir is not None else ckpt["train_config"].get("data")
    if data is not None:
        corpus = load_corpus(data, (split,))
        if not same_tokenizer(corpus.tokenizer, tok):
            raise DataError(f"{data} was tokenized with another tokenizer than checkpoint {path} was trained with; "
                            "evaluate on the folder it was trained on (or prepare with its tokenizer)")
        tokens = corpus.splits[split]
    else:
        lines = read_lines([wikitext_split(find_or_fetch(data_dir, (split,), offline), split)])
        tokens = Split(encode_lines(tok, lines), count_words(lines))
    result = perplexity(model, tokens, seq_len, batch_size, device)
    return {"checkpoint": str(path), "split": split, "model": model.config.linear, "step": ckpt["step"],
            "data": str(data) if data is not None else "wikitext-2", **result}
