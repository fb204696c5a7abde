"""A transformers tokenizer as a moealign :class:`~moealign.data.tokenizer.Tokenizer`, so that
RoMA's question encoding (:mod:`moealign.roma.choices`) runs on a Hugging Face model with its
own tokenizer (DESIGN.md §5)."""

from __future__ import annotations

import os

from transformers import PreTrainedTokenizerBase


class TransformersTokenizer:
    """``encode`` adds no special tokens (prompts and answers are concatenated as ids, the
    answer ending in ``eos_id``); ``eos_id`` is the tokenizer's EOS, ``pad_id`` its PAD or,
    lacking one, its EOS (rows are right-padded, and under causal attention no real token sees
    the padding); ``vocab_size`` counts added tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer={type(tokenizer).__name__} has eos_token_id=None; accepted: a "
                "tokenizer with an EOS token (answers end with it); set tokenizer.eos_token"
            )
        self._tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id: int = self.eos_id if pad is None else pad
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        self.save_pretrained(path)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self._tokenizer.save_pretrained(directory)
