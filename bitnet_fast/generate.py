"""Text from a training checkpoint: `bitnet-fast generate CHECKPOINT --prompt TEXT`.

The prompt is tokenized as training saw text: the stream starts with `<eos>`, every line but the last is followed by
`<eos>`, and generation continues the last line; a generated `<eos>` is a line break. Words the tokenizer cannot
represent become `<unk>` (with one warning).

Two engines produce the tokens, and both use a KV cache:
- "decoder": a BitNet checkpoint on the CPU runs through `decode.PackedDecoder` (the whole packed model in one Numba
  call per token, int8 output head). It stops at the model's context length, so it is used when the prompt and the
  new tokens fit in it.
- "torch": `LM.stream` (packed BitLinear layers for BitNet; plain torch for fp), which slides its window when the
  context fills up. Used for fp checkpoints, on CUDA, for longer generations, and when the decoder declines a model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import EOS, UNK
from .model import LM

ENGINES = ("auto", "decoder", "torch")


@dataclass
class Stats:
    """What `Generator.stream` measured: prompt (prefill) and decode token counts and seconds, and the engine.
    The seconds are the engine's alone (not detokenizing or printing)."""

    engine: str
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    new_tokens: int = 0
    decode_seconds: float = 0.0  # the tokens after the first (whose time is the prefill's)

    def summary(self) -> str:
        decoded = max(self.new_tokens - 1, 0)
        prompt_rate = self.prompt_tokens / max(self.prompt_seconds, 1e-9)
        return (f"[{self.engine}] prompt {self.prompt_tokens} tokens at {prompt_rate:.1f} tokens/s, "
                f"decode {decoded} tokens at {decoded / max(self.decode_seconds, 1e-9):.1f} tokens/s")


class Generator:
    """A checkpoint's model (packed for inference when BitNet) and tokenizer, ready to continue prompts; or a decoder
    file (`bitnet-fast export --format decoder`), mapped, which runs on the decoder engine only."""

    def __init__(self, checkpoint: str | os.PathLike, device: str = "cpu") -> None:
        from tokenizers import Tokenizer

        from .decoder_file import is_decoder_file, load_decoder
        from .nn import pack_model

        self.device, self._decoder, self.decoder_error = device, None, None
        self.model: LM | None = None
        if is_decoder_file(checkpoint):
            if device != "cpu":
                raise ValueError(f"{checkpoint} is a decoder file, which runs on the CPU; use --device cpu")
            self._decoder = load_decoder(checkpoint)
            if self._decoder.tokenizer is None:
                raise ValueError(f"{checkpoint} is a decoder file without a tokenizer; write it with `bitnet-fast "
                                 "export CHECKPOINT OUT --format decoder`")
            self.tokenizer = Tokenizer.from_str(self._decoder.tokenizer)
            self.context = self._decoder.config.max_len
        else:
            ckpt = load_checkpoint(checkpoint)
            self.tokenizer = Tokenizer.from_str(ckpt["tokenizer"])
            self.model = model_from_checkpoint(ckpt, device).eval()
            if self.model.config.linear == "bitnet":
                pack_model(self.model)
            self.context = self.model.config.max_seq_len
        self.eos, self.unk = self.tokenizer.token_to_id(EOS), self.tokenizer.token_to_id(UNK)

    def encode(self, prompt: str) -> tuple[list[int], list[str]]:
        """Token ids of `prompt` as training saw text (module docstring), and the words that became <unk>."""
        if not prompt.strip():
            raise ValueError("--prompt is empty; give some text to continue")
        ids, unknown = [self.eos], []
        lines = prompt.split("\n")
        for i, line in enumerate(lines):
            enc = self.tokenizer.encode(line, add_special_tokens=False)
            words = line.split()
            unknown += [words[w] for t, w in zip(enc.ids, enc.word_ids, strict=True)
                        if t == self.unk and w is not None and words[w] != UNK]
            ids += enc.ids + ([self.eos] if i < len(lines) - 1 else [])
        return ids, list(dict.fromkeys(unknown))

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, <eos> as a line break."""
        lines, line = [], []
        for t in ids:
            if t == self.eos:
                lines.append(line)
                line = []
            else:
                line.append(t)
        return "\n".join(self.tokenizer.decode(seg) for seg in [*lines, line])

    def decoder(self):
        """The PackedDecoder for this model, or None (with `decoder_error` saying why) when it does not apply."""
        if self._decoder is None and self.decoder_error is None:
            if self.model.config.linear != "bitnet" or self.device != "cpu":
                self.decoder_error = "the packed decoder runs BitNet models on the CPU"
            else:
                try:
                    from .decode import PackedDecoder

                    self._decoder = PackedDecoder.from_model(self.model)
                except (ValueError, TypeError, ImportError) as e:
                    self.decoder_error = str(e)
        return self._decoder

    def pick_engine(self, engine: str, prompt_len: int, max_new_tokens: int) -> str:
        """"auto": the decoder when it applies and prompt + new tokens fit in the context, else torch."""
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}; use one of {ENGINES}")
        if engine == "torch":
            if self.model is None:
                raise ValueError("--engine torch needs a training checkpoint; a decoder file runs on the decoder "
                                 "engine")
            return engine
        fits = prompt_len + max_new_tokens <= self.context
        if self.decoder() is None or not fits:
            if engine == "decoder" or self.model is None:
                why = self.decoder_error or (f"prompt ({prompt_len}) + new tokens ({max_new_tokens}) exceed the "
                                             f"context of {self.context} tokens")
                fix = ("use --engine torch" if self.model is not None else "use fewer --max-new-tokens, or the "
                       "training checkpoint (its torch engine slides its window)")
                raise ValueError(f"the decoder cannot run this: {why}; {fix}")
            return "torch"
        return "decoder"

    def tokens(self, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
               engine: str) -> Iterator[int]:
        """Token ids continuing `ids` from the chosen engine."""
        if engine == "decoder":
            yield from self.decoder().generate(ids, max_new_tokens, temperature, top_k, seed)
            return
        gen = torch.Generator(self.device).manual_seed(seed)
        idx = torch.tensor([ids], device=self.device)
        for t in self.model.stream(idx, max_new_tokens, temperature, top_k, gen):
            yield int(t)

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int | None = 50,
               seed: int = 0, engine: str = "auto", warn: Callable[[str], None] | None = None,
               ) -> Iterator[str | Stats]:
        """Yield the generated text piece by piece as tokens arrive, then the Stats."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        ids, unknown = self.encode(prompt)
        if unknown and warn is not None:
            warn(f"warning: {len(unknown)} word(s) of the prompt are not in the vocabulary and became {UNK}: "
                 + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
        stats = Stats(self.pick_engine(engine, len(ids), max_new_tokens), prompt_tokens=len(ids))
        out: list[int] = []
        shown = ""
        t0 = time.perf_counter()
        for tok in self.tokens(ids, max_new_tokens, temperature, top_k, seed, stats.engine):
            now = time.perf_counter()
            if not out:
                stats.prompt_seconds = now - t0  # prefill and the first token
            else:
                stats.decode_seconds += now - t0
            out.append(tok)
            text = self.decode(out)
            text = text if text.startswith("\n") or prompt.endswith("\n") else " " + text  # after the last word
            piece = text[_common_prefix(shown, text):]  # a BPE decode only ever appends, but be safe
            if piece:
                yield piece
            shown = text
            t0 = time.perf_counter()
        stats.new_tokens = len(out)
        yield stats


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
