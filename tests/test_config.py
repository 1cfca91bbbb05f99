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
    assert cfg.model.vocab_size == cfg.data.vocab_size


@pytest.mark.parametrize("name,low,high", [("t5_base", 200e6, 250e6), ("t5_large", 700e6, 800e6),
                                           ("hardware/tpu_v5e_32", 200e6, 250e6),
                                           ("hardware/gpu_2x8", 200e6, 250e6)])
def test_hardware_presets_load_with_their_sizes(name, low, high):
    import jax
    from flax import nnx

    from model import Transformer

    cfg = load_config([str(CONFIGS / f"{name}.yaml")])
    assert cfg.model.vocab_size == cfg.data.vocab_size
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert low <= count <= high, count
