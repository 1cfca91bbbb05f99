"""Rules -> shardings: a golden table under the default rules, FSDP memory, rule errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from model import ModelConfig
from sharding.mesh import MeshError, make_mesh, resolve_mesh_shape
from sharding.rules import RulesError, as_flax_rules, load_rules, logical_to_spec
from trainer.train_state import create_state, make_state_spec

TINY = ModelConfig(vocab_size=50, d_model=64, num_heads=4, mlp_dim=128, encoder_layers=2, decoder_layers=2,
                   dropout=0.0, max_length=32)

# Golden table: logical axis names of each parameter kind and their spec under the default rules
# on a (data, fsdp, tensor) mesh. Keyed by the parameter's last path element(s).
GOLDEN = {
    ("vocab", "embed"): P("tensor", "fsdp"),
    ("embed", "heads", "kv"): P("fsdp", "tensor", None),
    ("heads", "kv", "embed"): P("tensor", None, "fsdp"),
    ("embed", "mlp"): P("fsdp", "tensor"),
    ("mlp", "embed"): P("tensor", "fsdp"),
    ("embed",): P("fsdp"),
    ("embed", "vocab"): P("fsdp", "tensor"),
    ("length", "embed"): P(None, "fsdp"),
}


def _flat(tree):
    from flax import nnx

    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]


def _names(variable):
    return tuple(variable.get_metadata()["out_sharding"])


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_every_param_and_moment_matches_the_golden_table(scan):
    import dataclasses

    cfg = dataclasses.replace(TINY, scan_layers=scan)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = load_rules("default")
    tx = optax.adamw(1e-3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(as_flax_rules(rules)):
        spec = make_state_spec(cfg, tx, mesh, rules, seed=0)
    params = _flat(spec.shardings["params"])
    moments = [(p, v) for p, v in _flat(spec.shardings["opt_state"]) if hasattr(v, "get_metadata")]
    assert len(params) > 10
    assert len(moments) == 2 * len(params)  # Adam's mu and nu, one per parameter
    for path, variable in params + moments:
        names = _names(variable)
        stripped = tuple(n for n in names if n != "layers")
        expected = GOLDEN[stripped]
        if scan and "layers" in names:
            assert names[0] == "layers", path
            expected = P(None, *expected)
        assert variable.get_value().spec == expected, (jax.tree_util.keystr(path), names)


def test_fsdp8_state_bytes_per_device_are_an_eighth():
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    rules = load_rules("default")
    tx = optax.adamw(1e-3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(as_flax_rules(rules)):
        spec = make_state_spec(TINY, tx, mesh, rules, seed=0)
        state = create_state(spec)
    arrays = [x for x in jax.tree.leaves({"p": state["params"], "o": state["opt_state"]})]
    total = sum(x.nbytes for x in arrays)
    per_device = {d: 0 for d in mesh.devices.flat}
    for x in arrays:
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    slack = 4096  # replicated scalars (Adam's count) and tiny vectors that do not split
    assert max(per_device.values()) <= total / 8 + slack, (max(per_device.values()), total / 8)


def test_params_are_created_on_their_shards_not_replicated():
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rules = load_rules("default")
    with jax.set_mesh(mesh), nn.logical_axis_rules(as_flax_rules(rules)):
        spec = make_state_spec(TINY, optax.adamw(1e-3), mesh, rules, seed=0)
        state = create_state(spec)
    embedding = [x for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0] if x.ndim == 2 and
                 x.shape[0] == TINY.padded_vocab_size][0]
    assert embedding.sharding.spec == P("tensor", "fsdp")
    assert embedding.addressable_shards[0].data.shape == (TINY.padded_vocab_size // 2, 64 // 4)


def test_first_rule_that_fits_wins():
    rules = load_rules([["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["embed", "tensor"]])
    assert logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), "tensor")
    assert logical_to_spec(("embed",), rules) == P("fsdp")


def test_rule_errors():
    with pytest.raises(RulesError, match="unknown mesh axis `model`"):
        load_rules([["embed", "model"]])
    with pytest.raises(RulesError, match="conflict"):
        load_rules([["embed", "fsdp"], ["embed", "fsdp"]])
    with pytest.raises(RulesError, match="conflict"):
        load_rules([["embed", ["fsdp", "fsdp"]]])
    with pytest.raises(RulesError, match="conflict"):
        load_rules([["embed", None], ["embed", "fsdp"]])
    with pytest.raises(RulesError, match="no rule for logical axis `mlp`"):
        logical_to_spec(("embed", "mlp"), load_rules([["embed", "fsdp"]]), what="parameter x")
    with pytest.raises(RulesError, match="preset `nope` not found"):
        load_rules("nope")


# Golden specs of every preset in configs/rules/: parameter kinds (as in GOLDEN above, plus a
# scanned `layers` stack) and the activations the model names.
PRESET_KINDS = [
    ("vocab", "embed"), ("embed", "heads", "kv"), ("heads", "kv", "embed"), ("embed", "mlp"), ("mlp", "embed"),
    ("embed",), ("embed", "vocab"), ("length", "embed"), ("layers", "embed", "mlp"), ("batch", "length"),
    ("activation_batch", "activation_length", "activation_embed"),
    ("activation_batch", "activation_length", "activation_heads", "activation_kv"),
    ("activation_batch", "activation_length", "activation_mlp"),
    ("activation_batch", "activation_length", "activation_vocab"),
]
BATCH2 = ("data", "fsdp")
BATCH3 = ("data", "fsdp", "tensor")
PRESET_GOLDEN = {
    "default": [
        P("tensor", "fsdp"), P("fsdp", "tensor", None), P("tensor", None, "fsdp"), P("fsdp", "tensor"),
        P("tensor", "fsdp"), P("fsdp"), P("fsdp", "tensor"), P(None, "fsdp"), P(None, "fsdp", "tensor"),
        P(BATCH2, None), P(BATCH2, None, None), P(BATCH2, None, "tensor", None), P(BATCH2, None, "tensor"),
        P(BATCH2, None, "tensor"),
    ],
    # every matrix split over fsdp along its first dimension that has a rule to fsdp; no tensor axis
    "fsdp": [
        P("fsdp", None), P("fsdp", None, None), P("fsdp", None, None), P("fsdp", None), P("fsdp", None),
        P("fsdp"), P("fsdp", None), P(None, "fsdp"), P(None, "fsdp", None),
        P(BATCH2, None), P(BATCH2, None, None), P(BATCH2, None, None, None), P(BATCH2, None, None),
        P(BATCH2, None, None),
    ],
    # parameters replicated, the batch over every axis
    "data_parallel": [
        P(None, None), P(None, None, None), P(None, None, None), P(None, None), P(None, None),
        P(None), P(None, None), P(None, None), P(None, None, None),
        P(BATCH3, None), P(BATCH3, None, None), P(BATCH3, None, None, None), P(BATCH3, None, None),
        P(BATCH3, None, None),
    ],
}


@pytest.mark.parametrize("name", sorted(PRESET_GOLDEN))
def test_presets_match_their_golden_tables(name):
    rules = load_rules(name)
    got = [logical_to_spec(kind, rules) for kind in PRESET_KINDS]
    assert got == PRESET_GOLDEN[name], [(k, g) for k, g, want in zip(PRESET_KINDS, got, PRESET_GOLDEN[name])
                                        if g != want]


def test_every_preset_is_in_the_golden_tables_and_runs_default_to_the_default_preset():
    from sharding.rules import PRESET_DIR
    from trainer.config import Config, load_config

    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted(PRESET_GOLDEN)
    # One home for the default table: configs/rules/default.yaml, which the golden tests above check.
    assert Config().rules == "default"
    assert load_config([]).rules == "default"


def test_mesh_shape_fill_and_errors():
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(MeshError, match=r"mesh\.data=3, mesh\.fsdp=1, mesh\.tensor=1"):
        resolve_mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
    with pytest.raises(MeshError, match=r"mesh\.fsdp"):
        resolve_mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)


def test_vocab_padding_splits_over_any_mesh(tmp_path):
    """A vocabulary of 50 on tensor=8... and an odd tensor size still shards evenly."""
    from tests.conftest import read_metrics, tiny_config
    from trainer.train import train

    train(tiny_config(tmp_path, "mesh.fsdp=1", "mesh.tensor=8", "model.num_heads=8", "model.vocab_multiple=3",
                      "model.vocab_size=50", "train.steps=2", "train.log_every=1", "checkpoint.save_final=false",
                      "train.batch_size=8"), devices=jax.devices())
    assert np.isfinite(read_metrics(tmp_path)[-1]["loss"])


@pytest.mark.parametrize("preset", sorted(PRESET_GOLDEN))
def test_parameter_and_activation_resolvers_agree_on_every_logical_name(preset):
    """Parameters resolve through sharding.rules, activations through Flax's resolver: same table, same answer."""
    from model.axes import ALL_AXES

    rules = load_rules(preset)
    flax_rules = as_flax_rules(rules)
    for name in ALL_AXES:
        ours = logical_to_spec((name,), rules)
        theirs = nn.logical_to_mesh_axes((name,), flax_rules)
        assert tuple(ours) == tuple(theirs), (preset, name, ours, theirs)
    # Two names that compete for one mesh axis: both resolvers give it to the first only.
    for pair in [("activation_batch", "activation_embed"), ("embed", "mlp"), ("activation_heads", "activation_mlp")]:
        assert tuple(logical_to_spec(pair, rules)) == tuple(nn.logical_to_mesh_axes(pair, flax_rules)), (preset, pair)


def test_tracing_under_a_mesh_without_rules_is_an_error_and_without_a_mesh_a_no_op():
    from flax import nnx

    from model import Transformer
    from model.axes import MissingRulesError

    model = Transformer(TINY, rngs=nnx.Rngs(params=0))
    x = jnp.ones((2, 8), jnp.int32)
    assert model(x, x).shape == (2, 8, TINY.padded_vocab_size)  # unsharded: constraints do nothing
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:2])
    with jax.set_mesh(mesh), pytest.raises(MissingRulesError, match="without logical-axis rules"):
        jax.jit(lambda a: model(a, a))(x)
