"""train -> checkpoint -> `python -m trainer.decode`, and generation metrics in eval."""


import numpy as np
import pytest

from tests.conftest import read_metrics, run_cli, tiny_config

# The reverse-task config of tests/test_train_cli.py (>= 0.98 token accuracy in 300 steps),
# trained a little longer so whole sequences come out right.
LEARNING = ("model.d_model=64", "model.mlp_dim=256", "train.learning_rate=5e-3", "train.batch_size=32",
            "train.steps=400", "train.warmup_steps=30", "train.log_every=100", "train.eval_every=400",
            "decode.eval_samples=64", "decode.eval_text_samples=3")


def _eval_examples(cfg, n):
    """The first n held-out (source, reference) pairs as text, in the eval pipeline's order."""
    from trainer.data import build_pipeline
    from trainer.text import ids_to_text

    data = build_pipeline(cfg.data, split="eval", global_batch_size=cfg.train.batch_size, seed=cfg.seed,
                          vocab_size=cfg.model.vocab_size)
    pairs = []
    for batch in data:
        for row in range(batch["inputs"].shape[0]):
            if batch["targets_segment_ids"][row].max() and len(pairs) < n:
                pairs.append((ids_to_text(batch["inputs"][row], None), ids_to_text(batch["targets"][row], None)))
    return pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import jax

    from trainer.train import train

    workdir = tmp_path_factory.mktemp("reverse")
    cfg = tiny_config(workdir, *LEARNING)
    last = train(cfg, devices=jax.devices()[:1])
    return cfg, workdir, last


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Two steps and a final checkpoint: enough for the command's input handling."""
    import jax

    from trainer.train import train

    workdir = tmp_path_factory.mktemp("short")
    cfg = tiny_config(workdir, "train.steps=2", "train.eval_every=0")
    train(cfg, devices=jax.devices()[:1])
    return cfg, workdir


def _decode(workdir, tmp_path, sources, *extra):
    path = tmp_path / "in.txt"
    path.write_text("".join(s + "\n" for s in sources))
    out = tmp_path / "out.txt"
    proc = run_cli(["-m", "trainer.decode", f"workdir={workdir}", f"input={path}", f"output={out}", *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().split("\n")
    assert lines[-1] == "" and len(lines) == len(sources) + 1
    return lines[:-1], proc


@pytest.mark.slow
def test_decode_command_on_held_out_examples(trained, tmp_path):
    """Greedy (and beam 4) decoding of unseen sequences through the decode command, from the
    final checkpoint of a run trained on the reverse task."""
    cfg, workdir, _ = trained
    pairs = _eval_examples(cfg, 200)
    sources, references = zip(*pairs)
    outputs, proc = _decode(workdir, tmp_path, sources, "decode.batch_size=64")
    assert "checkpoint step 400" in proc.stderr
    exact = np.mean([o == r for o, r in zip(outputs, references)])
    assert exact >= 0.95, (exact, list(zip(outputs, references))[:10])
    assert all(r == " ".join(reversed(s.split())) for s, r in pairs)

    beam, _ = _decode(workdir, tmp_path, sources[:64], "decode.beam_size=4", "decode.batch_size=32")
    assert np.mean([o == r for o, r in zip(beam, references)]) >= 0.95


@pytest.mark.slow
def test_eval_bleu_equals_sacrebleu_on_the_same_outputs(trained, tmp_path):
    """The eval record's BLEU / chrF / exact match are sacrebleu's scores of the outputs that the
    decode command gives for the same 64 held-out examples against their references; all three
    land in metrics.jsonl and TensorBoard, with text samples."""
    import sacrebleu

    cfg, workdir, last = trained
    record = read_metrics(workdir, "eval")[-1]
    assert record["step"] == 400 and record["generated"] == 64
    assert last["eval"]["bleu"] == record["bleu"]
    pairs = _eval_examples(cfg, 64)
    sources, references = zip(*pairs)
    outputs, _ = _decode(workdir, tmp_path, sources, "decode.batch_size=32")
    assert record["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [list(references)]).score, abs=1e-9)
    assert record["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outputs, [list(references)]).score, abs=1e-9)
    assert record["exact_match"] == pytest.approx(np.mean([o == r for o, r in zip(outputs, references)]))
    assert 0 < record["bleu"] <= 100 + 1e-9

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    for key in ("bleu", "chrf", "exact_match"):
        events = acc.Scalars(f"eval/{key}")
        assert [e.step for e in events] == [400]
        assert np.float32(events[0].value) == np.float32(record[key])
    texts = acc.Tensors("eval/samples/text_summary")
    assert texts and "reference" in texts[-1].tensor_proto.string_val[0].decode()


def test_generation_metrics_match_sacrebleu_directly():
    import sacrebleu

    from trainer.generation_eval import generation_metrics

    outs = ["the cat sat on the mat", "a b c", "hello world", ""]
    refs = ["the cat sat on the mat", "a b d", "hello there world", "x"]
    m = generation_metrics(outs, refs)
    assert m["exact_match"] == 0.25 and m["generated"] == 4
    assert m["bleu"] == sacrebleu.corpus_bleu(outs, [refs]).score
    assert m["chrf"] == sacrebleu.corpus_chrf(outs, [refs]).score


def test_empty_lines_and_invalid_utf8(short_run, tmp_path):
    cfg, workdir = short_run
    data = b"5 6 7 8\n\n\xff\xfe 9\nnot ids\n  \n9 10 11\r\n12 13"  # no newline at the end
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "trainer.decode", f"workdir={workdir}", "input=-"], input=data,
                          capture_output=True, cwd=ROOT, timeout=600,
                          env={k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"})
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr[-3000:]
    lines = proc.stdout.decode().split("\n")
    assert lines[-1] == "" and len(lines) == 8, lines  # 7 input lines, 7 output lines
    lines = lines[:-1]
    assert lines[1] == "" and lines[2] == "" and lines[3] == "" and lines[4] == ""
    assert "line 3: invalid UTF-8" in stderr and "skipped" in stderr
    assert "line 4:" in stderr  # not token ids (a synthetic-data run)
    for i in (0, 5, 6):  # decoded lines: token ids (an untrained model may say anything, even nothing)
        assert all(t.isdigit() for t in lines[i].split()), lines[i]
    assert "line 1:" not in stderr and "line 2:" not in stderr and "line 5:" not in stderr


def test_missing_checkpoint_config_and_input_are_clear_errors(short_run, tmp_path):
    cfg, workdir = short_run
    src = tmp_path / "in.txt"
    src.write_text("5 6 7\n")

    # A run directory with its config but no checkpoints.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((workdir / "config.yaml").read_text())
    proc = run_cli(["-m", "trainer.decode", f"workdir={empty}", f"input={src}"])
    assert proc.returncode == 2
    assert "no checkpoints" in proc.stderr and str(empty) in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = run_cli(["-m", "trainer.decode", f"workdir={tmp_path / 'nothing'}", f"input={src}"])
    assert proc.returncode == 2 and "config.yaml" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_cli(["-m", "trainer.decode", f"workdir={workdir}", f"input={src}", "checkpoint_step=999"])
    assert proc.returncode == 2 and "checkpoint_step=999" in proc.stderr and "steps: 2" in proc.stderr

    proc = run_cli(["-m", "trainer.decode", f"workdir={workdir}", f"input={tmp_path / 'missing.txt'}"])
    assert proc.returncode == 2 and "missing.txt" in proc.stderr

    proc = run_cli(["-m", "trainer.decode", f"workdir={workdir}", f"input={src}", "decode.beam_size=0"])
    assert proc.returncode == 2 and "decode.beam_size" in proc.stderr


def test_decode_config_errors_name_the_key(tmp_path):
    from trainer.config import ConfigError

    for override, key in (("decode.beam_size=0", "decode.beam_size"), ("decode.top_p=0", "decode.top_p"),
                          ("decode.temperature=-1", "decode.temperature"),
                          ("decode.eval_samples=-1", "decode.eval_samples"),
                          ("decode.max_length=0", "decode.max_length")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            tiny_config(tmp_path, override)
    with pytest.raises(ConfigError, match="beam search"):
        tiny_config(tmp_path, "decode.beam_size=4", "decode.temperature=0.7")
    with pytest.raises(ConfigError, match="decode.beamsize"):
        tiny_config(tmp_path, "decode.beamsize=4")
    cfg = tiny_config(tmp_path, "decode.beam_size=4", "decode.max_length=12")
    assert cfg.decode.beam_size == 4 and cfg.decode.max_length == 12 and cfg.decode.eval_samples == 0
