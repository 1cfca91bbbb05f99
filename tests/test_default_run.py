"""The default config end to end: embedded text, a trained SentencePiece vocabulary, packing."""

import pytest
import yaml

from tests.conftest import read_metrics, run_cli


@pytest.mark.slow
def test_default_config_trains_on_embedded_text_and_eval_loss_falls(tmp_path):
    proc = run_cli(["-m", "trainer.train", f"workdir={tmp_path}", "train.steps=40", "train.eval_every=20",
                    "train.eval_batches=4", "decode.eval_samples=8", "checkpoint.every=0",
                    "checkpoint.save_final=false"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensorboard --logdir" in proc.stdout

    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["data"]["source"] == "embedded" and resolved["data"]["tokenizer"] == "sentencepiece"
    assert resolved["data"]["tokenizer_path"].endswith(".model")  # the trained vocabulary is recorded

    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[1]["loss"] < evals[0]["loss"] - 0.1, evals
    assert {"bleu", "chrf", "exact_match"} <= set(evals[-1])
    train = read_metrics(tmp_path)
    assert train[-1]["packing_efficiency"] > 0.8  # packed: most of each row is real tokens
