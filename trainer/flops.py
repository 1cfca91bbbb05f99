"""Model FLOPs and peak FLOP/s for MFU (docs/mfu.md: every forward matmul, times 3)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from model.config import ModelConfig

# Published dense bf16 peaks per chip, by `device_kind` prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


def model_flops_per_step(cfg: ModelConfig, batch: int, inputs_length: int, targets_length: int) -> float:
    """Training FLOPs of one step on `batch` sequences: 3 x the forward pass's matmuls.

    Counts Q/K/V/O projections, attention scores and weighted values (encoder and decoder
    self-attention, cross-attention), the feed-forward layers and the output logits over the
    padded vocabulary. Embedding lookups count 0; attention is counted in full (no causal
    halving), since the kernels compute the full score matrix.
    """
    d, hd = cfg.d_model, cfg.num_heads * (cfg.head_dim or cfg.d_model // cfg.num_heads)
    mlp_mats = 3 if cfg.activation in ("gated_gelu", "swiglu") else 2
    li, lt = inputs_length, targets_length

    def proj(tokens: int, n: int) -> float:  # n projections d <-> heads*kv
        return 2.0 * tokens * d * hd * n

    def attend(q_len: int, kv_len: int) -> float:  # scores and values
        return 2.0 * 2 * q_len * kv_len * hd

    def mlp(tokens: int) -> float:
        return 2.0 * tokens * d * cfg.mlp_dim * mlp_mats

    encoder = cfg.encoder_layers * (proj(li, 4) + attend(li, li) + mlp(li))
    decoder = cfg.decoder_layers * (
        proj(lt, 4) + attend(lt, lt)            # self-attention
        + proj(lt, 2) + proj(li, 2) + attend(lt, li)  # cross-attention: q,o on targets; k,v on inputs
        + mlp(lt))
    logits = 2.0 * lt * d * cfg.padded_vocab_size
    return 3.0 * batch * (encoder + decoder + logits)


def measure_peak_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5, min_seconds: float = 1.0,
                       max_repeats: int = 40) -> float:
    """Peak FLOP/s of one device, measured with a jitted square matmul (used on CPU).

    The fastest of at least `repeats` matmuls and about `min_seconds` of them: on a shared VM the
    best of 5 (~0.5 s) once came out at half the usual peak, and the run printed MFU above 100%.
    """
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best, start = float("inf"), time.perf_counter()
    for i in range(max_repeats):
        if i >= repeats and time.perf_counter() - start >= min_seconds:
            break
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops_per_device(dtype: str = "float32") -> tuple[float, str]:
    """The chip's published peak, or a measured one on CPU; returns (FLOP/s, where it came from)."""
    return _peak_flops(jax.local_devices()[0].device_kind, dtype)


@functools.cache
def _peak_flops(kind: str, dtype: str) -> tuple[float, str]:
    # Measured once per process: each run started in it (a notebook, a sweep, the test suite's
    # in-process runs) would otherwise spend another second of matmuls on the same answer.
    for prefix, peak in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return peak, f"published peak of {kind}"
    return measure_peak_flops(dtype), f"measured on {kind}"
