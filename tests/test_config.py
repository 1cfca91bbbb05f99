"""Config loading: overrides, and errors that name the key at fault."""

import pytest

from tests.conftest import CONFIGS, tiny_config
from trainer.config import ConfigError, load_config


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=7", "model.dropout=0.25", "model.scan_layers=true", "mesh.fsdp=2")
    assert cfg.train.steps == 7
    assert cfg.model.dropout == 0.25
    assert cfg.model.scan_layers is True
    assert cfg.mesh.fsdp == 2


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.stepz.*did you mean `train\.steps`"):
        tiny_config(tmp_path, "train.stepz=3")
    with pytest.raises(ConfigError, match=r"`modle`"):
        tiny_config(tmp_path, "modle.d_model=3")


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: " + str(CONFIGS / "tiny.yaml") + "\nmodel:\n  d_modle: 8\n")
    with pytest.raises(ConfigError, match=r"model\.d_modle.*bad\.yaml"):
        load_config([str(path)])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps.*expects int.*'many'"):
        tiny_config(tmp_path, "train.steps=many")
    with pytest.raises(ConfigError, match=r"model\.scan_layers.*expects bool"):
        tiny_config(tmp_path, "model.scan_layers=3")


def test_impossible_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        tiny_config(tmp_path, "train.batch_size=10", "train.grad_accum_steps=3")
    with pytest.raises(ConfigError, match=r"model\.activation"):
        tiny_config(tmp_path, "model.activation=tanh")


def test_mesh_that_does_not_match_devices_names_the_mesh_keys(tmp_path):
    import jax

    from trainer.train import train

    cfg = tiny_config(tmp_path, "mesh.data=3", "mesh.fsdp=1")
    with pytest.raises(ConfigError, match=r"mesh\.data=3.*mesh\.fsdp=1.*8 are available"):
        train(cfg, devices=jax.devices())


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    import jax

    from trainer.train import train

    cfg = tiny_config(tmp_path, "mesh.fsdp=8", "train.batch_size=12")
    with pytest.raises(ConfigError, match=r"train\.batch_size \(12\).*data-parallel size 8"):
        train(cfg, devices=jax.devices())


def test_default_config_loads_and_base_files_merge():
    cfg = load_config([])
    assert cfg.data.source == "embedded"
    assert cfg.model.vocab_size is None  # one key for one fact: the tokenizer's size (data.vocab_size)


@pytest.mark.parametrize("name,low,high", [("t5_base", 200e6, 250e6), ("t5_large", 700e6, 800e6),
                                           # the published sizes of google/t5-v1_1-small, -base, flan-t5-base
                                           ("t5_v1_1_small", 76_961_152, 76_961_152),
                                           ("t5_v1_1_base", 247_577_856, 247_577_856),
                                           ("flan_t5_base", 247_577_856, 247_577_856),
                                           # transformers' count for byt5-small's config (384 ids in 384 rows)
                                           ("byt5_small", 299_637_760, 299_637_760),
                                           ("hardware/tpu_v5e_32", 200e6, 250e6),
                                           ("hardware/gpu_2x8", 200e6, 250e6)])
def test_hardware_presets_load_with_their_sizes(name, low, high):
    import jax
    from flax import nnx

    from model import Transformer

    from trainer.run import resolve_vocab_size

    cfg = load_config([str(CONFIGS / f"{name}.yaml")])
    assert cfg.model.vocab_size is None
    cfg = resolve_vocab_size(cfg, cfg.data.vocab_size)  # what training does once the tokenizer is known
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert low <= count <= high, count


# --------------------------------------------------------------------------------------------
# Every numeric key against its domain: (key, bad value, other overrides it needs). The tiny
# config (synthetic data, sinusoidal positions, lengths 16) is the base; every row must fail with
# a ConfigError naming the key, and every numeric key of every config section must have a row.

BAD_VALUES = [
    ("seed", -1, ()), ("seed", 2**32, ()), ("seed", 2**70, ()),
    ("runtime.cpu_devices", 0, ()), ("runtime.cpu_devices", 100_000, ()),
    ("mesh.data", 0, ()), ("mesh.fsdp", -2, ()), ("mesh.tensor", 0, ()),
    ("mesh.dcn_data", 0, ()), ("mesh.dcn_fsdp", -1, ()),
    ("train.steps", -1, ()),
    ("train.batch_size", 0, ()), ("train.batch_size", -16, ()),
    ("train.grad_accum_steps", 0, ()), ("train.grad_accum_steps", 3, ()),
    ("train.learning_rate", 0, ()), ("train.learning_rate", -1e-3, ()), ("train.learning_rate", ".inf", ()),
    ("train.learning_rate", ".nan", ()),
    ("train.warmup_steps", -1, ()),
    ("train.end_learning_rate_ratio", -0.1, ()), ("train.end_learning_rate_ratio", 1.5, ()),
    ("train.end_learning_rate_ratio", ".nan", ()),
    ("train.weight_decay", -1, ()), ("train.weight_decay", ".inf", ()),
    ("train.adam_b1", -0.1, ()), ("train.adam_b1", 1, ()), ("train.adam_b1", 2, ()),
    ("train.adam_b2", -0.1, ()), ("train.adam_b2", 1, ()),
    ("train.adam_eps", 0, ()), ("train.adam_eps", -1e-8, ()), ("train.adam_eps", ".inf", ()),
    ("train.grad_clip_norm", -1, ()), ("train.grad_clip_norm", ".inf", ()),
    ("train.label_smoothing", -0.1, ()), ("train.label_smoothing", 1, ()),
    ("train.log_every", 0, ()),
    ("train.eval_every", -1, ()),
    ("train.hang_timeout", -1, ()), ("train.hang_timeout", ".inf", ()),
    ("train.eval_batches", -1, ()),
    ("checkpoint.every", -1, ()),
    ("checkpoint.keep", 0, ()),
    ("checkpoint.keep_period", -1, ()),
    ("model.vocab_size", 0, ()), ("model.vocab_size", -5, ()), ("model.vocab_size", 5, ()),
    ("model.vocab_size", None, ()),  # synthetic data has no tokenizer to take it from
    ("model.vocab_multiple", 0, ()),
    ("model.d_model", 0, ()),
    ("model.num_heads", 0, ()), ("model.num_heads", 5, ()),
    ("model.head_dim", 0, ()),
    ("model.mlp_dim", 0, ()),
    ("model.encoder_layers", 0, ()),
    ("model.decoder_layers", 0, ()),
    ("model.dropout", -0.1, ()), ("model.dropout", 1, ()), ("model.dropout", ".nan", ()),
    ("model.attention_dropout", 1, ()),
    ("model.norm_eps", 0, ()), ("model.norm_eps", 1, ()), ("model.norm_eps", ".inf", ()),
    ("model.max_length", 0, ()), ("model.max_length", 8, ("model.positions=learned",)),
    ("model.relative_buckets", 2, ()), ("model.relative_max_distance", 0, ()),
    ("model.relative_max_distance", 16, ("model.relative_buckets=32",)),
    ("data.eval_fraction", -0.1, ()), ("data.eval_fraction", 1, ()),
    ("data.eval_max_examples", 0, ()),
    ("data.vocab_size", 300, ()), ("data.vocab_size", 2**25, ()),
    ("data.num_sentinels", -1, ()), ("data.num_sentinels", 2, ("data.source=embedded", "model.vocab_size=null",
                                                              "data.inputs_length=128", "data.targets_length=32")),
    ("data.inputs_length", 1, ()), ("data.inputs_length", 2**21, ()),
    ("data.targets_length", 1, ()), ("data.targets_length", 2, ("data.source=embedded", "model.vocab_size=null")),
    ("data.noise_density", 0, ()), ("data.noise_density", 1, ()),
    ("data.mean_noise_span_length", 0.5, ()), ("data.mean_noise_span_length", ".inf", ()),
    ("data.synthetic_min_length", 0, ()), ("data.synthetic_min_length", 11, ()),
    ("data.synthetic_max_length", 0, ()), ("data.synthetic_max_length", 3, ()),
    ("data.synthetic_train_examples", 0, ()),
    ("data.synthetic_eval_examples", 0, ()),
    ("data.synthetic_seed", -1, ()), ("data.synthetic_seed", 2**32, ()),
    ("data.workers", -1, ()),
    ("data.prefetch", 0, ()),
    ("data.max_bad_fraction", -0.1, ()), ("data.max_bad_fraction", 1.5, ()),
    ("data.eval_fraction", 0, ("data.source=embedded", "model.vocab_size=null", "train.eval_every=10")),
    ("distributed.num_processes", 0, ()),
    ("distributed.process_id", -1, ()), ("distributed.process_id", 2, ("distributed.num_processes=2",)),
    ("distributed.local_device_ids", -1, ()),
    ("distributed.initialization_timeout", 0, ()),
    ("decode.beam_size", 0, ()), ("decode.beam_size", 10_000, ()),
    ("decode.max_length", 0, ()), ("decode.max_length", 100_000, ()),
    ("decode.max_length", 20, ("model.positions=learned", "model.max_length=16")),
    ("decode.alpha", -1, ()), ("decode.alpha", ".inf", ()),
    ("decode.temperature", -1, ()), ("decode.temperature", ".inf", ()),
    ("decode.top_k", -1, ()),
    ("decode.top_p", 0, ("decode.temperature=1",)), ("decode.top_p", 1.5, ("decode.temperature=1",)),
    ("decode.seed", -1, ()), ("decode.seed", 2**32, ()),
    ("decode.batch_size", 0, ()),
    ("decode.eval_samples", -1, ()),
    ("decode.eval_text_samples", -1, ()),
]


def _numeric_keys(cls=None, prefix=""):
    """Every config key whose type admits a number (int or float), e.g. `train.adam_b1`."""
    import dataclasses
    import types
    import typing

    from trainer.config import Config, _resolved_types

    cls = cls or Config
    keys = []
    for name, tp in _resolved_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _numeric_keys(tp, prefix + name + ".")
            continue
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if int in args or float in args:
            keys.append(prefix + name)
    return keys


def _yaml(value):
    return "null" if value is None else str(value)


@pytest.mark.parametrize("key,value,extra", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_every_bad_numeric_value_is_a_config_error_naming_the_key(tmp_path, key, value, extra):
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, *extra, f"{key}={_yaml(value)}")
    assert key in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_every_numeric_key_has_bad_values_in_the_table():
    covered = {k for k, _, _ in BAD_VALUES}
    missing = sorted(set(_numeric_keys()) - covered)
    assert not missing, f"add bad values for {missing} to BAD_VALUES (and validate them)"


@pytest.mark.parametrize("overrides", [
    ("model.positions=learned", "model.max_length=16"),
    ("decode.max_length=64",),
    ("seed=4294967295", "decode.seed=4294967295", "data.synthetic_seed=4294967295"),
    ("train.adam_b1=0", "train.grad_clip_norm=0", "train.weight_decay=0", "train.end_learning_rate_ratio=1"),
    ("train.eval_batches=0", "checkpoint.keep_period=0"),
], ids=["learned-fits", "decode-at-the-limit", "largest-seeds", "zeros-that-mean-off", "edges"])
def test_values_at_the_edge_of_their_domain_are_accepted(tmp_path, overrides):
    tiny_config(tmp_path, *overrides)


def test_presets_and_defaults_pass_validation():
    for path in [None, *sorted(CONFIGS.glob("*.yaml")), *sorted(CONFIGS.glob("hardware/*.yaml"))]:
        load_config([] if path is None else [str(path)])


def test_model_vocab_size_follows_the_tokenizer():
    """model.vocab_size defaults to the tokenizer's size; an explicit one must equal it."""
    from trainer.run import resolve_vocab_size

    cfg = load_config(["data.tokenizer=bytes"])
    assert cfg.model.vocab_size is None
    assert resolve_vocab_size(cfg, 360).model.vocab_size == 360
    explicit = load_config(["data.tokenizer=bytes", "model.vocab_size=360"])
    assert resolve_vocab_size(explicit, 360) is explicit
    with pytest.raises(ConfigError, match=r"model\.vocab_size.*4096.*360"):
        resolve_vocab_size(load_config(["model.vocab_size=4096"]), 360)
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        resolve_vocab_size(_with_vocab(cfg, None), None)


def _with_vocab(cfg, value):
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=value))


def test_bytes_tokenizer_needs_no_other_key(tmp_path):
    """`data.tokenizer=bytes` on the default config trains without touching model.vocab_size, and the
    run's config.yaml records the size it resolved to (smaller model keys only to keep this fast)."""
    import jax
    import yaml

    from trainer.train import train

    cfg = load_config(["data.tokenizer=bytes", f"workdir={tmp_path}", "train.steps=0", "model.d_model=32",
                       "model.num_heads=2", "model.mlp_dim=32", "model.encoder_layers=1", "model.decoder_layers=1",
                       "train.eval_every=0", "checkpoint.save_final=false"])
    train(cfg, devices=jax.devices()[:1])
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert recorded["model"]["vocab_size"] == 260 + cfg.data.num_sentinels


@pytest.mark.parametrize("message,expected", [
    ("INTERNAL: src/trainer_interface.cc(744) [(trainer_spec_.vocab_size()) == (model_proto->pieces_size())] "
     "Vocabulary size too high (3996). Please set it to a value <= 284.", "data.vocab_size=384"),
    ("Vocabulary size too high (3996). Please set it to a value <= 200.", "data.tokenizer=bytes"),
    ("INTERNAL: src/trainer_interface.cc(638) [...] Vocabulary size is smaller than required_chars. 265 vs 283. "
     "Increase vocab_size", "must be >= 383"),
    ("something else", "data.vocab_size"),
], ids=["too-large", "corpus-too-small", "too-small", "other"])
def test_sentencepiece_size_errors_name_the_size_that_works(message, expected):
    from trainer.data.config import DataConfig
    from trainer.data.sources import spm_size_error

    text = spm_size_error(DataConfig(), message)
    assert expected in text and text.startswith("data.vocab_size") and "\n" not in text
