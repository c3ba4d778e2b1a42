"""Perplexity of an LM on a token stream: token-level exp(NLL / tokens) and word-level exp(NLL / words).

Word-level perplexity uses the same total NLL over a denominator that does not depend on the tokenizer
(words incl. one <eos> per line), so BPE and word-level models and published WikiText-2 numbers compare.
"""

from __future__ import annotations

import math
import os

import psutil
import torch

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .corpus import load_corpus, same_tokenizer
from .data import DataError, Split, count_words, encode_lines, eval_windows, read_lines, wikitext_split
from .download import find_or_fetch
from .loss import chunk_bytes
from .plumbing import UserError, fmt


def check_eval_memory(n_tokens: int, seq_len: int, batch_size: int, config,
                      device: str | torch.device = "cpu") -> None:
    """Refuse, before anything is allocated, an eval batch whose activations cannot fit in the memory available on
    `device` (the kernel may kill a process that overcommits instead of raising MemoryError). The head and its loss
    run by row chunks (loss.py), so a batch holds its activations (~8 x n_embd + 3 x hidden fp32 per token at the
    MLP, the widest point) plus two chunks of logits, not the (rows, seq_len, vocab) logits."""
    rows = min(batch_size, max(1, (n_tokens - 1) // seq_len))  # eval_windows never makes more rows than that
    per_row = seq_len * 4 * (8 * config.n_embd + 3 * config.hidden)
    chunks = 2 * chunk_bytes(device)
    need = rows * per_row + chunks
    if torch.device(device).type == "cuda":
        have = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        have = psutil.virtual_memory().available
    if need > have:
        fit = min(max(1, int((have - chunks) // per_row)), batch_size - 1)
        raise UserError(f"--batch-size {batch_size} needs about {fmt(need, 'B')} for its activations but "
                        f"{fmt(have, 'B')} is available on {device}; use --batch-size {fit} or less")


@torch.no_grad()
def nll_sum(model: torch.nn.Module, split: Split, seq_len: int, batch_size: int = 16,
            device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """(summed NLL, tokens) over the eval windows of `split`; with shard=(rank, world), only batches
    rank, rank + world, ... (the ranks of a distributed run share the work; their sums add up to the whole)."""
    rank, world = shard
    config = getattr(model, "config", None)
    if config is not None:
        check_eval_memory(len(split.tokens), seq_len, batch_size, config, device)
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    for i, (x, y) in enumerate(eval_windows(split.tokens, seq_len, batch_size)):
        if i % world != rank:
            continue
        _, loss = model(x.to(device), y.to(device))  # mean NLL of the batch, the head fused with it
        nll += loss.item() * y.numel()
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
