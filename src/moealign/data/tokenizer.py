"""Tokenizers behind one interface (DESIGN.md §7): raw bytes, or a byte-level BPE trained with
Hugging Face ``tokenizers`` and cached on disk by a fingerprint of its training data.

Both save themselves as Hugging Face tokenizer files (:meth:`~Tokenizer.save_pretrained`:
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), which
``transformers.AutoTokenizer.from_pretrained`` loads with the same ids; BOS and EOS are both
``<|endoftext|>`` (as in GPT-2: moealign separates documents with EOS and adds no BOS), PAD is
``<|pad|>``, and no special token is added on encoding (no post-processor)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from moealign.io import atomic_write_text, naming_file, read_json

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = EOS_TOKEN
PAD_TOKEN = "<|pad|>"
_BYTE_TOKENIZER_KIND = "moealign-byte"
# Bump when the BPE recipe below changes, so cached files of the old recipe are not reused.
_BPE_RECIPE_VERSION = 1


@runtime_checkable
class Tokenizer(Protocol):
    """What the batching, training and evaluation code rely on."""

    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, path: str | os.PathLike) -> None: ...

    def save_pretrained(self, directory: str | os.PathLike) -> None: ...


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → character map, the alphabet of the ``tokenizers`` ByteLevel
    pre-tokenizer and decoder: printable Latin-1 bytes map to themselves, the other bytes to
    the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def byte_level_tokenizer() -> HFTokenizer:
    """The ``tokenizers`` twin of :class:`ByteTokenizer`: a byte-level BPE without merges whose
    256 base tokens are the bytes in id order (ByteLevel pre-tokenizer without its regex
    split, ByteLevel decoder), then EOS = 256 and PAD = 257."""
    alphabet = _bytes_to_unicode()
    tokenizer = HFTokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (EOS_TOKEN, PAD_TOKEN)]
    )
    return tokenizer


def save_hf_tokenizer(
    tokenizer: HFTokenizer, directory: str | os.PathLike, split_special_tokens: bool
) -> Path:
    """Write ``tokenizer`` to ``directory`` as the files ``AutoTokenizer.from_pretrained`` reads:
    ``tokenizer.json``, ``tokenizer_config.json`` (BOS = EOS = ``<|endoftext|>``, PAD =
    ``<|pad|>``, no cleanup of spaces on decoding) and ``special_tokens_map.json``, each
    atomically. ``split_special_tokens``: encode the literal text of a special token as
    ordinary text (the byte tokenizer) instead of as the special id (the BPE tokenizer)."""
    directory = Path(directory)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": split_special_tokens,
    }
    atomic_write_text(directory / "tokenizer.json", tokenizer.to_str())
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2))
    atomic_write_text(directory / "special_tokens_map.json", json.dumps(special, indent=2))
    return directory


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then EOS = 256 and PAD = 257."""

    def __init__(self) -> None:
        self.eos_id = 256
        self.pad_id = 257
        self.vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Special ids are dropped; invalid UTF-8 (a truncated generation) becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps({"kind": _BYTE_TOKENIZER_KIND}))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Hugging Face files of :func:`byte_level_tokenizer` (see :func:`save_hf_tokenizer`)."""
        save_hf_tokenizer(byte_level_tokenizer(), directory, split_special_tokens=True)


class BPETokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` with EOS and PAD special tokens; every byte is
    in the base alphabet, so any text encodes and ``decode(encode(text)) == text`` (except that
    a literal ``"<|endoftext|>"`` or ``"<|pad|>"`` in the text encodes to the special id, which
    decode drops)."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self._tokenizer = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in (EOS_TOKEN, PAD_TOKEN)}
        if None in ids.values():
            raise ValueError(
                f"tokenizer lacks the special tokens {EOS_TOKEN!r} and {PAD_TOKEN!r}: {ids}"
            )
        self.eos_id = ids[EOS_TOKEN]
        self.pad_id = ids[PAD_TOKEN]
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self._tokenizer.to_str())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Hugging Face files of this tokenizer (see :func:`save_hf_tokenizer`)."""
        save_hf_tokenizer(self._tokenizer, directory, split_special_tokens=False)


class TransformersTokenizer:
    """A transformers tokenizer (``PreTrainedTokenizerBase``) behind the moealign interface, for
    ``data.tokenizer = "hf:PATH"`` and for RoMA on a Hugging Face model (DESIGN.md §5).

    ``encode`` adds no special tokens (prompts and answers are concatenated as ids, the
    answer ending in ``eos_id``); ``eos_id`` is the tokenizer's EOS, ``pad_id`` its PAD or,
    lacking one, its EOS (rows are right-padded, and under causal attention no real token sees
    the padding); ``vocab_size`` counts added tokens."""

    def __init__(self, tokenizer) -> None:
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


def load_transformers_tokenizer(path_or_name: str) -> TransformersTokenizer:
    """``AutoTokenizer.from_pretrained(path_or_name)`` as a :class:`TransformersTokenizer`;
    ValueError (one line) when it cannot be loaded or has no EOS."""
    from transformers import AutoTokenizer  # optional dependency (the "hf" extra)

    from moealign.integrations.locations import pretrained_location

    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained_location(path_or_name, ""))
    except Exception as err:  # transformers' and tokenizers' own error types too
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"no Hugging Face tokenizer at {path_or_name!r} ({reason}); accepted: a directory "
            "with tokenizer files (tokenizer.json or a slow tokenizer's vocabulary) or a "
            "hub name"
        ) from None
    return TransformersTokenizer(tokenizer)


def load_tokenizer(path: str | os.PathLike) -> ByteTokenizer | BPETokenizer:
    """Load what :meth:`ByteTokenizer.save` or :meth:`BPETokenizer.save` wrote."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer path={str(path)!r} is not a file")
    with naming_file("tokenizer file", path):
        data = read_json(path)
        if isinstance(data, dict) and data.get("kind") == _BYTE_TOKENIZER_KIND:
            return ByteTokenizer()
        return BPETokenizer(HFTokenizer.from_str(json.dumps(data)))


def texts_fingerprint(texts: Iterable[str]) -> str:
    """SHA-256 over the texts, each length-prefixed so that boundaries count."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, cache_dir: str | os.PathLike
) -> BPETokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (256 byte tokens, EOS, PAD, merges) on
    ``texts``, or load it from ``cache_dir`` when the same (texts, vocab_size) was trained
    before. The cache file name carries a hash of both; it is written atomically."""
    texts = list(texts)
    minimum = 256 + 2
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} must be at least {minimum} (bytes + specials)")
    if not any(texts):
        raise ValueError("texts is empty; the BPE tokenizer needs training text")
    key = hashlib.sha256(
        f"{_BPE_RECIPE_VERSION}:{vocab_size}:{texts_fingerprint(texts)}".encode()
    ).hexdigest()[:20]
    path = Path(cache_dir) / f"bpe-{vocab_size}-{key}.json"
    if path.is_file():
        return load_tokenizer(path)
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bpe = BPETokenizer(tokenizer)
    bpe.save(path)
    return bpe


def build_tokenizer(
    kind: str,
    texts: Iterable[str] | None = None,
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """``"byte"``: :class:`ByteTokenizer`; ``"bpe"``: :func:`train_bpe_tokenizer` (needs
    ``texts`` and ``cache_dir``); ``"hf:PATH"``: :func:`load_transformers_tokenizer`."""
    if kind.startswith("hf:"):
        return load_transformers_tokenizer(kind[3:])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if texts is None or cache_dir is None:
            raise ValueError(
                f"kind='bpe' needs texts and cache_dir (got texts={'set' if texts else None}, "
                f"cache_dir={cache_dir!r})"
            )
        return train_bpe_tokenizer(texts, vocab_size, cache_dir)
    raise ValueError(f"kind={kind!r} is not a tokenizer kind; accepted: 'byte', 'bpe', 'hf:PATH'")
