"""Hugging Face T5 import/export, checked against `transformers` itself (its Flax T5, no torch, no network).

Random small T5 models are created locally in two styles, both with heads * head_dim != d_model
and different encoder/decoder depths: v1.0 (ReLU, tied output scaled by d_model^-0.5) and v1.1
(gated GELU, untied output head). Our logits must equal transformers' within 1e-4 in float32 on
a batch with padding, greedy decoding token for token, beam search the same best sequence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT
from tests.object_store import _server_logs, object_store  # noqa: F401  (fixtures)

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers 4.57 (Flax T5)")

VOCAB = 100
STYLES = {
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def _flax_t5():
    """transformers' Flax T5, made to run on this JAX (its code still passes jnp.clip's removed a_min/a_max)."""
    if not getattr(jnp.clip, "_hf_shim", False):
        clip = jnp.clip

        def shim(a, a_min=None, a_max=None, **kw):
            return clip(a, kw.pop("min", a_min), kw.pop("max", a_max), **kw)

        shim._hf_shim = True
        jnp.clip = shim
    from transformers import FlaxT5ForConditionalGeneration, T5Config

    return FlaxT5ForConditionalGeneration, T5Config


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{style: (directory with flax_model.msgpack, directory with Flax-layout model.safetensors, model)}."""
    model_cls, config_cls = _flax_t5()
    out = {}
    for style, extra in STYLES.items():
        config = config_cls(vocab_size=VOCAB, d_model=32, d_kv=6, num_heads=4, d_ff=48, num_layers=2,
                            num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                            dropout_rate=0.0, decoder_start_token_id=0, **extra)
        model = model_cls(config, seed=1 if style == "v1_0" else 2)
        msgpack_dir = tmp_path_factory.mktemp(f"hf-{style}-msgpack")
        safetensors_dir = tmp_path_factory.mktemp(f"hf-{style}-safetensors")
        model.save_pretrained(msgpack_dir)
        model.save_pretrained(safetensors_dir, safe_serialization=True)
        out[style] = (msgpack_dir, safetensors_dir, model)
    return out


def _batch():
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, VOCAB, size=(4, 12)).astype(np.int32)
    inputs[0, 7:] = 0  # padding
    inputs[2, 3:] = 0
    targets = rng.integers(2, VOCAB, size=(4, 9)).astype(np.int32)
    return inputs, targets


def _hf_logits(model, inputs, targets):
    decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    out = model(input_ids=inputs, attention_mask=(inputs != 0).astype(np.int32), decoder_input_ids=decoder_inputs)
    return np.asarray(out.logits)


def _import(path, devices, *overrides):
    """Our model config + parameters of the HF checkpoint at `path`, placed on a mesh of `devices`."""
    from trainer.hf_weights import WeightFiles, load_params
    from trainer.import_hf import import_config
    from trainer.run import Run

    cfg, rows = import_config(Path(path), "unused-workdir", list(overrides))
    run = Run.from_config(cfg, devices)
    with run.context():
        spec = run.params_spec()
        params = load_params(WeightFiles(path), spec.restore_target(), run.model_cfg)
    return cfg, run, spec, params


def _our_logits(run, spec, params, inputs, targets):
    from flax import nnx

    with run.context():
        @jax.jit
        def forward(params, inputs, targets):
            return nnx.merge(spec.graphdef, params)(inputs, targets)

        return np.asarray(forward(params, inputs, targets))


MESHES = {"1dev": (1, 1, 1), "2x2x2": (2, 2, 2)}


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("style", list(STYLES))
def test_imported_logits_equal_transformers(hf_models, style, mesh, scan):
    msgpack_dir, safetensors_dir, model = hf_models[style]
    inputs, targets = _batch()
    expected = _hf_logits(model, inputs, targets)
    data, fsdp, tensor = MESHES[mesh]
    devices = jax.devices()[: data * fsdp * tensor]
    # msgpack on one layout, safetensors on the other: both readers on both meshes over the matrix.
    path = msgpack_dir if scan else safetensors_dir
    cfg, run, spec, params = _import(path, devices, f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                                     f"mesh.tensor={tensor}", f"model.scan_layers={str(scan).lower()}")
    ours = _our_logits(run, spec, params, inputs, targets)
    assert ours.shape[-1] >= VOCAB
    np.testing.assert_allclose(ours[..., :VOCAB], expected, atol=1e-4, rtol=0)


def _our_generate(run, spec, params, inputs, **settings):
    from flax import nnx

    with run.context():
        @jax.jit
        def generate(params, inputs):
            return nnx.merge(spec.graphdef, params).generate(inputs, **settings)[0]

        return np.asarray(generate(params, inputs))


@pytest.mark.parametrize("style", list(STYLES))
def test_greedy_and_beam_search_equal_transformers_generate(hf_models, style):
    msgpack_dir, _, model = hf_models[style]
    inputs, _ = _batch()
    length = 10
    _, run, spec, params = _import(msgpack_dir, jax.devices()[:1], "mesh.fsdp=1")
    mask = (inputs != 0).astype(np.int32)

    expected = np.asarray(model.generate(inputs, attention_mask=mask, max_new_tokens=length, do_sample=False,
                                         num_beams=1).sequences)[:, 1:]  # transformers starts with the start id 0
    ours = _our_generate(run, spec, params, inputs, max_length=length)
    np.testing.assert_array_equal(ours[:, : expected.shape[1]], expected)
    assert not ours[:, expected.shape[1]:].any()  # transformers stops when every row has ended

    # Beam search without length normalisation (our alpha=0, transformers' length_penalty=0): the
    # best beam is the most probable sequence in both.
    beams = np.asarray(model.generate(inputs, attention_mask=mask, max_new_tokens=length, do_sample=False,
                                      num_beams=4, length_penalty=0.0, early_stopping=True).sequences)[:, 1:]
    ours = _our_generate(run, spec, params, inputs, max_length=length, beam_size=4, alpha=0.0)
    np.testing.assert_array_equal(ours[:, : beams.shape[1]], beams)


def _export_hf(params, cfg, out, max_shard_bytes=5 * 10**9):
    from trainer.export import write_hf

    os.makedirs(out)
    write_hf(cfg, params, str(out), max_shard_bytes)
    return Path(out)


# Both styles and both layer layouts, in two runs (each run exports twice and imports three times).
@pytest.mark.parametrize("style, scan", [("v1_0", False), ("v1_1", True)], ids=["v1_0-loop", "v1_1-scan"])
def test_export_loads_in_transformers_and_imports_back_bitwise(hf_models, style, scan, tmp_path):
    msgpack_dir, _, model = hf_models[style]
    model_cls, _ = _flax_t5()
    inputs, targets = _batch()
    # Exported from a 2x2x2 mesh, in shards of at most 4 kB (so the index file is exercised).
    cfg, run, spec, params = _import(msgpack_dir, jax.devices(), "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                     f"model.scan_layers={str(scan).lower()}")
    ours = _our_logits(run, spec, params, inputs, targets)
    out = _export_hf(params, cfg, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(not k.endswith(".kernel") for k in f.keys())  # PyTorch naming

    loaded = model_cls.from_pretrained(out)  # transformers converts the PyTorch layout itself (no torch)
    np.testing.assert_allclose(_hf_logits(loaded, inputs, targets), ours[..., :VOCAB], atol=1e-4, rtol=0)
    np.testing.assert_allclose(_hf_logits(loaded, inputs, targets), _hf_logits(model, inputs, targets), atol=1e-5,
                               rtol=0)

    # import(export(x)) is x, bit for bit, on another mesh; also from a sharded export (numbered
    # files + index, here at most 4 kB each), which Hub checkpoints above 5 GB are.
    sharded = _export_hf(params, cfg, tmp_path / "sharded", max_shard_bytes=4000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    for path in (out, sharded):
        _, _, _, again = _import(path, jax.devices()[:4], "mesh.fsdp=4", f"model.scan_layers={str(scan).lower()}")
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _run(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _t5_spiece(path):
    """A 300-piece SentencePiece model in T5's id layout (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(600)]
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(3000)] + ["the lazy dog"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path / "spiece"), vocab_size=300,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2)
    return path / "spiece.model"


@pytest.mark.slow
def test_import_decode_finetune_export_commands(hf_models, tmp_path):
    """The commands a user runs: import -> decode -> fine-tune -> export -> transformers loads it."""
    msgpack_dir, _, model = hf_models["v1_1"]
    run_dir = tmp_path / "run"
    r = _run("trainer.import_hf", msgpack_dir, "--out", run_dir, "runtime.cpu_devices=8", "mesh.fsdp=4",
             "mesh.tensor=2", "model.scan_layers=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (run_dir / "checkpoints" / "0").is_dir()
    cfg_text = (run_dir / "config.yaml").read_text()
    assert "source: synthetic" in cfg_text and "positions: relative" in cfg_text

    # Decode: no tokenizer, so the text is token ids; the output equals transformers' greedy.
    inputs, _ = _batch()
    (tmp_path / "in.txt").write_text("\n".join(" ".join(str(t) for t in row if t) for row in inputs) + "\n")
    r = _run("trainer.decode", f"workdir={run_dir}", f"input={tmp_path / 'in.txt'}", f"output={tmp_path / 'out.txt'}",
             "decode.max_length=6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # decode appends EOS to each source, as T5's tokenizer does for transformers.
    with_eos = np.zeros((inputs.shape[0], inputs.shape[1] + 1), np.int32)
    for i, row in enumerate(inputs):
        ids = [t for t in row if t] + [1]
        with_eos[i, : len(ids)] = ids
    expected = np.asarray(model.generate(with_eos, attention_mask=(with_eos != 0).astype(np.int32),
                                         max_new_tokens=6, do_sample=False).sequences)[:, 1:]
    want = []
    for row in expected.tolist():
        row = row[: row.index(1)] if 1 in row else row
        want.append(" ".join(str(t) for t in row if t))
    assert (tmp_path / "out.txt").read_text().splitlines() == want

    # Export straight from the import: transformers loads it and gives its own logits back.
    r = _run("trainer.export", f"workdir={run_dir}", "format=hf", f"output={tmp_path / 'hf'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model_cls, _ = _flax_t5()
    inputs, targets = _batch()
    np.testing.assert_allclose(_hf_logits(model_cls.from_pretrained(tmp_path / "hf"), inputs, targets),
                               _hf_logits(model, inputs, targets), atol=1e-5, rtol=0)

    # Fine-tune the imported run: it starts from the imported parameters at step 0, fresh optimizer.
    r = _run("trainer.train", run_dir / "config.yaml", "train.steps=3", "train.batch_size=8", "train.log_every=1",
             "train.eval_every=0", "data.inputs_length=16", "data.targets_length=16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "parameters only: a fresh optimizer" in r.stdout + r.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if x["split"] == "train"] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "3").is_dir()


@pytest.mark.slow
def test_restore_from_hf_starts_training_from_the_checkpoint(hf_models, tmp_path):
    msgpack_dir, _, _ = hf_models["v1_0"]
    r = _run("trainer.train", ROOT / "configs" / "tiny.yaml", f"workdir={tmp_path / 'w'}",
             f"checkpoint.restore_from=hf:{msgpack_dir}", "model.d_model=32", "model.num_heads=4", "model.head_dim=6",
             "model.mlp_dim=48", "model.encoder_layers=2", "model.decoder_layers=3", "model.activation=relu",
             "model.norm=rmsnorm", "model.positions=relative", "model.relative_buckets=8",
             "model.relative_max_distance=20", "model.attention_scaling=false", "model.tie_output=true",
             f"model.vocab_size={VOCAB}", "model.vocab_multiple=1", "model.dropout=0.0", "train.steps=1",
             "train.log_every=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"initialised params from the Hugging Face checkpoint {msgpack_dir}" in r.stdout


def test_import_from_and_to_a_bucket(hf_models, object_store, tmp_path):
    """`trainer.import_hf gs://.../ckpt --out gs://.../run` (and s3://): the run's parameters equal a
    local import's, bit for bit."""
    from trainer import storage
    from trainer.checkpoint import restore_items

    _, safetensors_dir, _ = hf_models["v1_1"]
    source, run_dir = object_store.url("hf", "t5"), object_store.url("runs", "imported")
    storage.copy_tree(str(safetensors_dir), source)
    r = _run("trainer.import_hf", source, "--out", run_dir, "runtime.cpu_devices=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert storage.isfile(storage.join(run_dir, "config.yaml"))
    cfg, run, spec, params = _import(safetensors_dir, jax.devices()[:1])
    with run.context():
        restored, step = restore_items(storage.join(run_dir, "checkpoints"), {"params": spec.restore_target()})
    assert step == 0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_spiece_tokenizer_is_imported_and_decodes_text(hf_models, tmp_path):
    """A checkpoint with T5's tokenizer layout (no BOS: id 3 is a piece) imports with it."""
    from trainer.data.vocab import SentencePieceTokenizer
    from trainer.import_hf import import_config

    msgpack_dir, _, _ = hf_models["v1_0"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in msgpack_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    spiece = _t5_spiece(ckpt)
    # 300 pieces + 98 sentinels = 398 ids in 400 rows (as T5's 32,100 ids in 32,128 rows).
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 98}))
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "vocab_size": 400}))
    cfg, rows = import_config(ckpt, str(tmp_path / "run"), [])
    tok = SentencePieceTokenizer.load(str(spiece), 98)
    assert (cfg.model.vocab_size, rows, cfg.model.padded_vocab_size) == (398, 400, 400)
    assert cfg.data.tokenizer_path == str(tmp_path / "run" / "spiece.model") and cfg.data.num_sentinels == 98
    text = "the lazy dog"
    assert tok.decode(list(tok.encode(text)) + [1]) == text
    piece = tok._sp.decode([3])  # id 3 is an ordinary piece here, not a BOS to skip
    assert piece and tok.decode([3]) == piece


@pytest.mark.parametrize("problem, expected", [
    ("activation", "field `feed_forward_proj` is 'gelu'"),
    ("missing", "weight encoder.final_layer_norm.weight is missing"),
    ("unexpected", "unexpected weight encoder.extra.weight"),
    ("vocabulary", "mismatched vocabulary"),
])
def test_import_errors_name_the_problem(hf_models, tmp_path, capsys, problem, expected):
    from safetensors.numpy import load_file, save_file

    from trainer import import_hf

    _, safetensors_dir, _ = hf_models["v1_0"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = json.loads((safetensors_dir / "config.json").read_text())
    tensors = load_file(str(safetensors_dir / "model.safetensors"))
    if problem == "activation":
        config["feed_forward_proj"] = "gelu"
        config.pop("dense_act_fn", None)
    elif problem == "missing":
        tensors.pop("encoder.final_layer_norm.weight")
    elif problem == "unexpected":
        tensors["encoder.extra.weight"] = np.zeros(3, np.float32)
    else:
        config["vocab_size"] = 50  # fewer rows than the tokenizer below has ids
        _t5_spiece(ckpt)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "flax"})
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert import_hf.main([str(ckpt), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_import_error_lines(hf_models, tmp_path, capsys):
    _, safetensors_dir, _ = hf_models["v1_0"]
    from trainer import import_hf

    assert import_hf.main([str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert import_hf.main([str(safetensors_dir)]) == 2
    assert "--out RUN" in capsys.readouterr().err


def test_byt5_ids_equal_transformers_byt5_tokenizer_and_import_picks_them(hf_models, tmp_path):
    from transformers import ByT5Tokenizer

    from trainer.data.vocab import ByteTokenizer
    from trainer.import_hf import import_config

    theirs = ByT5Tokenizer()  # pure Python, nothing to download
    ours = ByteTokenizer(125, "byt5")
    assert ours.vocab_size == len(theirs) == 384
    for text in ["Hello, world!", "héllo wörld ✓", "tabs\tand  spaces"]:
        ids = list(ours.encode(text)) + [1]
        assert ids == theirs(text).input_ids
        assert ours.decode(ids) == text == theirs.decode(ids, skip_special_tokens=True)

    # A ByT5 checkpoint (no spiece.model; tokenizer_config.json names ByT5Tokenizer) imports with it.
    msgpack_dir, _, _ = hf_models["v1_1"]
    ckpt = tmp_path / "byt5"
    ckpt.mkdir()
    config = json.loads((msgpack_dir / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "vocab_size": 384}))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByT5Tokenizer", "extra_ids": 125}))
    cfg, rows = import_config(ckpt, str(tmp_path / "run"), [])
    assert (cfg.data.tokenizer, cfg.data.num_sentinels, cfg.model.vocab_size, rows) == ("byt5", 125, 384, 384)
