"""T5-style span corruption (the denoising objective of Raffel et al., 2020).

A token sequence is split into alternating non-noise / noise spans (starting with
non-noise). The inputs keep the non-noise spans and replace noise span i by
sentinel i; the targets are sentinel i followed by noise span i, for every span.
The number of noise tokens is round(n * noise_density) and the number of spans
round(noise / mean_noise_span_length), so both lengths are a function of n alone.
"""

from __future__ import annotations

import numpy as np


def corrupted_lengths(n: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths, eos included, for n tokens."""
    noise, spans = _counts(n, noise_density, mean_span)
    return n - noise + spans + 1, noise + spans + 1


def _counts(n: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    if n < 2:
        return 0, 0
    noise = min(max(int(round(n * noise_density)), 1), n - 1)
    spans = max(int(round(noise / mean_span)), 1)
    spans = min(spans, noise, n - noise)
    return noise, spans


def chunk_length(inputs_length: int, targets_length: int, noise_density: float, mean_span: float) -> int:
    """Longest token chunk whose corrupted inputs and targets fit the lengths (T5's helper)."""
    n = 2
    while True:
        i, t = corrupted_lengths(n + 1, noise_density, mean_span)
        if i > inputs_length or t > targets_length:
            break
        n += 1
    i, t = corrupted_lengths(n, noise_density, mean_span)
    if i > inputs_length or t > targets_length:
        raise ValueError(
            f"data.inputs_length={inputs_length} / data.targets_length={targets_length} are too short for "
            f"span corruption at noise_density={noise_density}, mean_noise_span_length={mean_span}"
        )
    return n


def _segment_lengths(total: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """`segments` positive integers summing to `total`, uniformly at random."""
    if segments == 1:
        return np.array([total])
    cuts = np.sort(rng.choice(np.arange(1, total), size=segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(n: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    noise, spans = _counts(n, noise_density, mean_span)
    mask = np.zeros(n, dtype=bool)
    if spans == 0:
        return mask
    noise_lens = _segment_lengths(noise, spans, rng)
    keep_lens = _segment_lengths(n - noise, spans, rng)
    pos = 0
    for k, z in zip(keep_lens, noise_lens):
        pos += k
        mask[pos : pos + z] = True
        pos += z
    return mask


def corrupt(
    tokens: np.ndarray, noise_density: float, mean_span: float, rng: np.random.Generator, sentinel_ids: np.ndarray
) -> dict[str, np.ndarray]:
    """-> {"inputs", "targets"} (no eos). sentinel_ids[i] is the id of sentinel i."""
    tokens = np.asarray(tokens, dtype=np.int32)
    mask = noise_mask(len(tokens), noise_density, mean_span, rng)
    if not mask.any():
        return {"inputs": tokens, "targets": np.zeros(0, np.int32)}
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]])) + 1
    if len(starts) > len(sentinel_ids):
        raise ValueError(
            f"{len(starts)} noise spans but only {len(sentinel_ids)} sentinels "
            "(raise data.num_sentinels or shorten the lengths)"
        )
    inputs, targets, prev = [], [], 0
    for i, (a, b) in enumerate(zip(starts, ends)):
        inputs += [tokens[prev:a], sentinel_ids[i : i + 1]]
        targets += [sentinel_ids[i : i + 1], tokens[a:b]]
        prev = b
    inputs.append(tokens[prev:])
    return {"inputs": np.concatenate(inputs).astype(np.int32), "targets": np.concatenate(targets).astype(np.int32)}


def reconstruct(inputs: np.ndarray, targets: np.ndarray, first_sentinel_id: int) -> np.ndarray:
    """Inverse of `corrupt` (eos already stripped): the original tokens."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets:
        t = int(t)
        if t >= first_sentinel_id:
            current = t
            spans[current] = []
        elif current is not None:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs:
        t = int(t)
        out.extend(spans.get(t, []) if t >= first_sentinel_id else [t])
    return np.asarray(out, dtype=np.int32)
