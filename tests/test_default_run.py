"""The default config end to end: embedded text, a trained SentencePiece vocabulary, packing,
and a model that visibly learns (its greedy outputs get closer to the reference text)."""

import pytest
import yaml

from tests.conftest import read_metrics, run_cli


@pytest.mark.slow
def test_default_config_learns_to_repair_embedded_text(tmp_path):
    # Half the default schedule (about 3 minutes on 2 cores): enough for the copy-and-repair
    # behaviour to appear, which a broken model, data path or metric cannot fake.
    proc = run_cli(["-m", "trainer.train", f"workdir={tmp_path}", "train.steps=300", "train.eval_every=100",
                    "decode.eval_samples=32", "checkpoint.every=0", "checkpoint.save_final=false"], timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensorboard --logdir" in proc.stdout

    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["data"]["source"] == "embedded" and resolved["data"]["tokenizer"] == "sentencepiece"
    assert resolved["data"]["objective"] == "infilling"
    assert resolved["data"]["tokenizer_path"].endswith(".model")  # the trained vocabulary is recorded

    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [100, 200, 300]
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0, evals
    # Generation: near 0 BLEU before the model copies, well above once it repairs the text.
    bleu = [r["bleu"] for r in evals]
    assert bleu[-1] >= 20 and bleu[-1] >= bleu[0] + 15, bleu
    assert evals[-1]["chrf"] >= evals[0]["chrf"] + 15, evals
    train = read_metrics(tmp_path)
    assert train[-1]["packing_efficiency"] > 0.8  # packed: most of each row is real tokens
