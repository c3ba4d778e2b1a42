"""Perplexity of an LM on a token stream: token-level exp(NLL / tokens) and word-level exp(NLL / words).

Word-level perplexity uses the same total NLL over a denominator that does not depend on the tokenizer
(words incl. one <eos> per line), so BPE and word-level models and published WikiText-2 numbers compare.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import Split, count_words, encode_lines, eval_windows, find_wikitext, read_lines, wikitext_split


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, split: Split, seq_len: int, batch_size: int = 16, device: str | torch.device = "cpu"
) -> dict:
    """NLL over every token of `split` after the first, in non-overlapping windows of seq_len."""
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    for x, y in eval_windows(split.tokens, seq_len, batch_size):
        logits, _ = model(x.to(device))  # (B, T, V)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum").item()
        n += y.numel()
    model.train(was_training)
    return {
        "loss": nll / n,
        "ppl": math.exp(nll / n),
        "word_ppl": math.exp(nll / split.words),
        "tokens": n,
        "words": split.words,
    }


def evaluate_checkpoint(
    path: str | os.PathLike,
    split: str = "valid",
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict:
    """Perplexity of a training checkpoint on a WikiText-2 split, tokenized with the checkpoint's tokenizer."""
    from tokenizers import Tokenizer

    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, device)
    tok = Tokenizer.from_str(ckpt["tokenizer"])
    lines = read_lines([wikitext_split(find_wikitext(data_dir), split)])
    result = perplexity(model, Split(encode_lines(tok, lines), count_words(lines)),
                        ckpt["train_config"]["seq_len"], batch_size, device)
    return {"checkpoint": str(path), "split": split, "model": model.config.linear, "step": ckpt["step"], **result}
