"""T5-style span corruption (the denoising objective of Raffel et al., 2020), and BART-style
text infilling (`infill`, at the end of this file).

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


def chunk_length(
    inputs_length: int, targets_length: int, noise_density: float, mean_span: float, objective: str = "span_corruption"
) -> int:
    """Longest token chunk whose corrupted inputs and targets fit the lengths (T5's helper).

    `objective="infilling"`: the same for `infill` (whose targets are the whole chunk).
    """
    if objective == "infilling":
        return infill_chunk_length(inputs_length, targets_length, noise_density, mean_span)
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


def _mask(n: int, noise_density: float, mean_span: float, rng: np.random.Generator, noise_lengths) -> np.ndarray:
    """Alternating kept / noise spans (kept first); `noise_lengths(noise, spans, rng)` draws the noise spans."""
    noise, spans = _counts(n, noise_density, mean_span)
    mask = np.zeros(n, dtype=bool)
    if spans == 0:
        return mask
    noise_lens = noise_lengths(noise, spans, rng)
    keep_lens = _segment_lengths(n - noise, spans, rng)
    pos = 0
    for k, z in zip(keep_lens, noise_lens):
        pos += k
        mask[pos : pos + z] = True
        pos += z
    return mask


def noise_mask(n: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    return _mask(n, noise_density, mean_span, rng, _segment_lengths)


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


# --------------------------------------------------------------------------- text infilling

# BART-style text infilling (Lewis et al., 2020): the inputs are the tokens with noise spans
# replaced by one sentinel each (sentinel i for span i), the targets are the whole original
# chunk. Unlike span corruption, most of every target can be copied from the inputs, so a small
# model learns the copy within a few hundred steps and its decoded text is the repaired chunk:
# readable samples, and BLEU against the original that rises as the model learns to fill gaps.
# The numbers of noise tokens and spans are those of span corruption (a function of n alone),
# so the lengths are too; only where the spans fall and how long each one is are drawn.


def infilled_lengths(n: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths, eos included, of `infill` on n tokens."""
    noise, spans = _counts(n, noise_density, mean_span)
    return n - noise + spans + 1, n + 1


def infill_chunk_length(inputs_length: int, targets_length: int, noise_density: float, mean_span: float) -> int:
    """Longest token chunk whose infilling inputs and targets (the chunk + eos) fit the lengths."""
    n = targets_length - 1
    while n >= 2 and infilled_lengths(n, noise_density, mean_span)[0] > inputs_length:
        n -= 1
    if n < 2:
        raise ValueError(
            f"data.inputs_length={inputs_length} / data.targets_length={targets_length} are too short for "
            f"infilling at noise_density={noise_density}, mean_noise_span_length={mean_span}"
        )
    return n


def _poisson_lengths(total: int, segments: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """`segments` positive integers summing to `total`, each about 1 + Poisson(mean - 1).

    The draws are then nudged to the exact total: surplus units are removed uniformly at
    random from the units above 1, a shortfall is spread uniformly over the segments.
    """
    lens = 1 + rng.poisson(max(mean - 1.0, 0.0), segments)
    diff = int(lens.sum()) - total
    if diff > 0:
        extra = np.repeat(np.arange(segments), lens - 1)  # one entry per unit above 1
        drop = rng.choice(len(extra), size=diff, replace=False)
        lens -= np.bincount(extra[drop], minlength=segments)
    elif diff < 0:
        lens += rng.multinomial(-diff, np.full(segments, 1.0 / segments))
    return lens


def infilling_mask(n: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """Like `noise_mask` (starts with kept text, same counts) with Poisson-ish span lengths."""
    return _mask(n, noise_density, mean_span, rng,
                 lambda noise, spans, r: _poisson_lengths(noise, spans, mean_span, r))


def infill(
    tokens: np.ndarray, noise_density: float, mean_span: float, rng: np.random.Generator, sentinel_ids: np.ndarray
) -> dict[str, np.ndarray]:
    """-> {"inputs": tokens with each noise span replaced by sentinel i, "targets": tokens} (no eos).

    Pure numpy; the same tokens and rng state give the same example.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    mask = infilling_mask(len(tokens), noise_density, mean_span, rng)
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    if len(starts) > len(sentinel_ids):
        raise ValueError(
            f"{len(starts)} noise spans but only {len(sentinel_ids)} sentinels "
            "(raise data.num_sentinels or shorten the lengths)"
        )
    inputs = tokens.copy()
    inputs[starts] = sentinel_ids[: len(starts)]
    keep = ~mask
    keep[starts] = True  # each span's first position now holds its sentinel
    return {"inputs": inputs[keep], "targets": tokens}
