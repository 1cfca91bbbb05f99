"""Token ids <-> text for decoding and eval samples; source rows like the input pipeline's.

Runs without a tokenizer (synthetic data) read and write space-separated ids.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from jax.experimental import multihost_utils

from trainer.data.vocab import EOS_ID, PAD_ID


def to_host(x: Any) -> np.ndarray:
    """The whole (global) array on every host."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def strip_ids(ids: Iterable[int]) -> list[int]:
    """Ids up to (not including) the first EOS, padding removed."""
    out = []
    for t in ids:
        t = int(t)
        if t == EOS_ID:
            break
        if t != PAD_ID:
            out.append(t)
    return out


def ids_to_text(ids: Iterable[int], tokenizer: Any | None) -> str:
    """Detokenize up to the first EOS; without a tokenizer (synthetic data), space-joined ids."""
    if tokenizer is None:
        return " ".join(str(t) for t in strip_ids(ids))
    return tokenizer.decode(strip_ids(ids))


def text_to_ids(text: str, tokenizer: Any | None, vocab_size: int) -> np.ndarray:
    """Tokenize one source line (no EOS). Synthetic runs read space-separated ids.

    Raises ValueError for a synthetic line that is not ids in [1, vocab_size).
    """
    if tokenizer is not None:
        return np.asarray(tokenizer.encode(text), np.int32)
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        raise ValueError("expected space-separated token ids (this run uses synthetic data)") from None
    bad = [t for t in ids if not 0 < t < vocab_size or t == EOS_ID]
    if bad:
        raise ValueError(f"token ids must be in [2, {vocab_size}) (eos 1 is added), got {bad[0]}")
    return np.asarray(ids, np.int32)


def pack_sources(sources: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, int]:
    """[n, length] int32 rows: each source + EOS, truncated like the input pipeline (EOS kept).

    Returns the rows and how many sources were truncated.
    """
    rows = np.zeros((len(sources), length), np.int32)
    truncated = 0
    for i, ids in enumerate(sources):
        if len(ids) > length - 1:
            truncated += 1
            ids = ids[: length - 1]
        rows[i, : len(ids)] = ids
        rows[i, len(ids)] = EOS_ID
    return rows, truncated
