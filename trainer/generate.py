"""Generation with a run's parameters on the mesh, and the generation metrics of eval.

Public API:
  DecodeConfig                 the `decode:` config section
  make_generate_fn(...)        jitted (params, inputs, seed) -> (tokens, scores) on the mesh
  ids_to_text / text_to_ids    detokenize / tokenize (synthetic data: space-joined ids)
  generation_metrics(outs, refs)  exact match, BLEU and chrF (sacrebleu)
  GenerationEval               what `run_eval` calls: generate for a fixed sample of eval
                               examples, return the metrics and a few (source, reference,
                               output) samples as text
"""

from __future__ import annotations

import re

import dataclasses
import functools
from typing import Any, Iterable, Sequence

import numpy as np

MAX_SEED = 2**32 - 1
MAX_BEAM_SIZE = 256
EOS_ID = 1  # trainer/data/vocab.py: pad 0, eos 1 (the model's search takes it as an argument)
PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """The `decode:` section: search settings of the decode command and of eval generation."""

    beam_size: int = 1  # 1 = greedy or sampling; > 1 = beam search
    max_length: int | None = None  # generated tokens incl. EOS; None = data.targets_length
    alpha: float = 0.6  # beam search length penalty ((5 + len) / 6) ** alpha
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples (beam_size must be 1)
    top_k: int = 0  # sampling: keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # sampling: nucleus probability mass (1 = all)
    seed: int = 0  # sampling: the same seed gives the same outputs
    batch_size: int = 32  # decode command: global batch (rounded up to the data-parallel size)
    eval_samples: int = 0  # eval examples that get generation metrics during training; 0 = off
    eval_text_samples: int = 4  # of those, how many go to TensorBoard as text

    def validate(self) -> None:
        def fail(field: str, what: str) -> None:
            raise ValueError(f"decode.{field}: {what}")

        def integer(field: str, minimum: int) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                fail(field, f"must be an integer, got {v!r}")
            if v < minimum:
                fail(field, f"must be >= {minimum}, got {v}")

        for field, minimum in (("beam_size", 1), ("top_k", 0), ("seed", 0), ("batch_size", 1),
                               ("eval_samples", 0), ("eval_text_samples", 0)):
            integer(field, minimum)
        if self.max_length is not None:
            integer("max_length", 1)
        if self.seed > MAX_SEED:
            fail("seed", f"must be <= {MAX_SEED} (2**32 - 1), got {self.seed}")
        if self.beam_size > MAX_BEAM_SIZE:
            fail("beam_size", f"must be <= {MAX_BEAM_SIZE}, got {self.beam_size}")
        if not 0 <= self.alpha < float("inf"):
            fail("alpha", f"must be a finite number >= 0, got {self.alpha!r}")
        if not 0 <= self.temperature < float("inf"):
            fail("temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.beam_size > 1 and self.temperature > 0:
            fail("temperature", f"sampling (temperature={self.temperature}) cannot be combined with beam "
                 f"search (decode.beam_size={self.beam_size}); set one of them back to its default")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            fail("temperature", "top_k / top_p only apply to sampling: set decode.temperature > 0 (e.g. 1.0)")

    @property
    def mode(self) -> str:
        if self.beam_size > 1:
            return f"beam search (beam {self.beam_size}, alpha {self.alpha})"
        if self.temperature > 0:
            return (f"sampling (temperature {self.temperature}, top_k {self.top_k}, top_p {self.top_p}, "
                    f"seed {self.seed})")
        return "greedy"


def resolve_max_length(decode_cfg: DecodeConfig, data_cfg: Any, model_cfg: Any) -> int:
    """decode.max_length, defaulting to data.targets_length; checked against the position table."""
    from trainer.config import ConfigError  # here: trainer.config imports this module

    n = decode_cfg.max_length or data_cfg.targets_length
    limit = max_length_limit(data_cfg, model_cfg)
    if n > limit:
        raise ConfigError(f"decode.max_length: {n} exceeds {limit}, " + (
            f"the learned position table (model.max_length={model_cfg.max_length})"
            if model_cfg.positions == "learned" else
            f"the longer of model.max_length ({model_cfg.max_length}) and data.targets_length "
            f"({data_cfg.targets_length})"))
    return n


def max_length_limit(data_cfg: Any, model_cfg: Any) -> int:
    """The longest decode.max_length allowed: the learned position table's size, or (sinusoidal
    positions, which have no table) the longer of model.max_length and data.targets_length."""
    if model_cfg.positions == "learned":
        return model_cfg.max_length
    return max(model_cfg.max_length, data_cfg.targets_length)


# ---------------------------------------------------------------------------------- generation


def _generate(params: Any, inputs: Any, seed: Any, *, graphdef: Any, decode_cfg: DecodeConfig,
              max_length: int) -> tuple[Any, Any]:
    import jax
    from flax import nnx

    from model.decoding import generate

    model = nnx.merge(graphdef, params)
    rng = jax.random.key(seed) if decode_cfg.temperature > 0 else None
    return generate(model, inputs, max_length=max_length, beam_size=decode_cfg.beam_size,
                    alpha=decode_cfg.alpha, temperature=decode_cfg.temperature, top_k=decode_cfg.top_k,
                    top_p=decode_cfg.top_p, rng=rng, eos_id=EOS_ID)


def make_generate_fn(graphdef: Any, decode_cfg: DecodeConfig, *, max_length: int, param_shardings: Any,
                     batch_sharding: Any):
    """Jitted `(params, inputs [batch, src_len], seed) -> (tokens [batch, max_length], scores)`.

    Inputs and outputs are sharded like a batch (rows over the data-parallel axes); the cache
    inside follows the logical-axis rules. Call (and trace) it under the run's mesh and rules
    contexts (`jax.set_mesh(mesh)`, `flax.linen.logical_axis_rules(rules)`).
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    fn = functools.partial(_generate, graphdef=graphdef, decode_cfg=decode_cfg, max_length=max_length)
    rows = NamedSharding(batch_sharding.mesh, PartitionSpec(batch_sharding.spec[0]))
    return jax.jit(fn, in_shardings=(param_shardings, batch_sharding, None),
                   out_shardings=(batch_sharding, rows))


def to_host(x: Any) -> np.ndarray:
    """The whole (global) array on every host."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---------------------------------------------------------------------------------------- text


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


# ------------------------------------------------------------------------------------- metrics


_SENTINEL = re.compile(r"\s*<extra_id_\d+>\s*")


def _without_sentinels(text: str) -> str:
    return _SENTINEL.sub(" ", text).strip()


def generation_metrics(outputs: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match (fraction of identical strings), bleu and chrf (sacrebleu's corpus scores, 0-100)."""
    import sacrebleu

    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    if not outputs:
        return {"exact_match": 0.0, "bleu": 0.0, "chrf": 0.0, "generated": 0}
    exact = sum(o == r for o, r in zip(outputs, references)) / len(outputs)
    # Span-corruption sentinels are structure, not text: left in, sacrebleu splits
    # `<extra_id_3>` into pieces that match between any two outputs and inflates the scores.
    hyps, refs = [_without_sentinels(o) for o in outputs], [_without_sentinels(r) for r in references]
    return {
        "exact_match": float(exact),
        "bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score),
        "generated": len(outputs),
    }


def format_samples(samples: Sequence[tuple[str, str, str]]) -> str:
    """Markdown for TensorBoard's text tab: one block per (source, reference, output)."""
    def quote(s: str) -> str:
        return "`" + s.replace("`", "'") + "`" if s else "(empty)"

    parts = []
    for i, (src, ref, out) in enumerate(samples):
        parts.append(f"**{i}** source: {quote(src)}  \nreference: {quote(ref)}  \noutput: {quote(out)}")
    return "\n\n".join(parts)


class GenerationEval:
    """Generation metrics on the first `decode.eval_samples` held-out examples (a fixed sample).

    Built once per run (the jitted generate function is reused at every eval); call it with the
    current parameters under the run's mesh and rules contexts. Returns
    `(metrics, samples)`: metrics `exact_match`, `bleu`, `chrf`, `generated` for the eval
    record, samples a list of (source, reference, output) strings, the first
    `decode.eval_text_samples` of them.
    """

    def __init__(self, cfg: Any, graphdef: Any, model_cfg: Any, *, param_shardings: Any, batch_sharding: Any,
                 to_global: Any, pipeline_args: dict[str, Any], tokenizer: Any | None):
        self.cfg = cfg
        self.decode_cfg: DecodeConfig = cfg.decode
        self.max_length = resolve_max_length(cfg.decode, cfg.data, model_cfg)
        self.generate = make_generate_fn(graphdef, cfg.decode, max_length=self.max_length,
                                         param_shardings=param_shardings, batch_sharding=batch_sharding)
        self.to_global = to_global
        self.pipeline_args = pipeline_args
        self.tokenizer = tokenizer
        self.last_outputs: list[str] = []
        self.last_references: list[str] = []
        self.last_sources: list[str] = []

    def __call__(self, params: Any) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
        from trainer.data import build_pipeline

        want = self.decode_cfg.eval_samples
        data = build_pipeline(self.cfg.data, split="eval", **self.pipeline_args)
        sources: list[str] = []
        references: list[str] = []
        outputs: list[str] = []
        for local in data:
            if len(outputs) >= want:
                break
            batch = self.to_global({k: local[k] for k in ("inputs", "targets", "targets_segment_ids")})
            tokens, _ = self.generate(params, batch["inputs"], self.decode_cfg.seed)
            tokens, inputs, targets, seg = (to_host(x) for x in (tokens, batch["inputs"], batch["targets"],
                                                                 batch["targets_segment_ids"]))
            for row in range(tokens.shape[0]):
                if seg[row].max() == 0 or len(outputs) >= want:  # padding rows of the last batch
                    continue
                sources.append(ids_to_text(inputs[row], self.tokenizer))
                references.append(ids_to_text(targets[row], self.tokenizer))
                outputs.append(ids_to_text(tokens[row], self.tokenizer))
        self.last_sources, self.last_references, self.last_outputs = sources, references, outputs
        metrics = generation_metrics(outputs, references)
        samples = list(zip(sources, references, outputs))[: self.decode_cfg.eval_text_samples]
        return metrics, samples
