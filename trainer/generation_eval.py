"""Generation metrics of eval: exact match, BLEU and chrF (sacrebleu) on a fixed eval sample.

`GenerationEval` is built once per run (its jitted search is reused at every eval) and called
with the current parameters; it returns the metrics for the eval record and a few
(source, reference, output) samples as text for TensorBoard.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from trainer.config import DecodeConfig
from trainer.data.vocab import Tokenizer
from trainer.run import Run
from trainer.step import jit_generate
from trainer.text import ids_to_text, to_host

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

    def __init__(self, run: Run, graphdef: Any, *, param_shardings: Any, tokenizer: Tokenizer | None):
        self.run = run
        self.decode_cfg: DecodeConfig = run.cfg.decode
        max_length = run.cfg.decode.max_length or run.cfg.data.targets_length  # checked by the config
        self.generate = jit_generate(graphdef, run.cfg.decode, max_length=max_length,
                                     param_shardings=param_shardings, batch_sharding=run.batch_sharding)
        self.tokenizer = tokenizer

    def __call__(self, params: Any) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
        want = self.decode_cfg.eval_samples
        sources: list[str] = []
        references: list[str] = []
        outputs: list[str] = []
        with self.run.pipeline("eval") as data:
            for local in data:
                if len(outputs) >= want:
                    break
                self._generate_batch(params, local, want, sources, references, outputs)
        metrics = generation_metrics(outputs, references)
        samples = list(zip(sources, references, outputs))[: self.decode_cfg.eval_text_samples]
        return metrics, samples

    def _generate_batch(self, params: Any, local: dict[str, Any], want: int, sources: list[str],
                        references: list[str], outputs: list[str]) -> None:
        """Generates for one eval batch and appends the real rows' texts (up to `want` in all)."""
        batch = self.run.to_global({k: local[k] for k in ("inputs", "targets", "targets_segment_ids")})
        tokens, _ = self.generate(params, batch["inputs"], self.decode_cfg.seed)
        tokens, inputs, targets, seg = (to_host(x) for x in (tokens, batch["inputs"], batch["targets"],
                                                             batch["targets_segment_ids"]))
        for row in range(tokens.shape[0]):
            if seg[row].max() == 0 or len(outputs) >= want:  # padding rows of the last batch
                continue
            sources.append(ids_to_text(inputs[row], self.tokenizer))
            references.append(ids_to_text(targets[row], self.tokenizer))
            outputs.append(ids_to_text(tokens[row], self.tokenizer))
