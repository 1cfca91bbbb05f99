"""The state initialiser: unrolled threefry on CPU while it is traced, the same values as the loop."""

import jax
import numpy as np
from flax import nnx

from tests.conftest import SMALL_DEFAULT
from trainer.config import load_config
from trainer.optim import make_optimizer
from trainer.run import Run
from trainer.train_state import _unrolled_threefry_on_cpu, create_state


def _bits(shape):
    return jax.jit(lambda: jax.random.bits(jax.random.key(3), shape)).lower()


def test_the_initialiser_is_unrolled_and_gives_the_looped_values_on_their_shards(tmp_path):
    # The default data path (SentencePiece on the embedded corpus gives the vocabulary), a small model.
    cfg = load_config([*SMALL_DEFAULT, f"workdir={tmp_path}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    run, data = Run.from_config(cfg, jax.devices()).open_train_data()
    data.close()
    tx, _ = make_optimizer(run.cfg.train)
    with run.context():
        spec = run.state_spec(tx)
        with nnx.use_eager_sharding(False):
            # Unrolled first: nothing lowered under the swap may leak into a later lowering.
            with _unrolled_threefry_on_cpu():
                unrolled = jax.jit(lambda: spec.init_fn(), out_shardings=spec.shardings).lower().compile()
            looped = jax.jit(lambda: spec.init_fn(), out_shardings=spec.shardings).lower().compile()
        assert " while(" in looped.as_text()  # JAX's own CPU lowering: one loop per hash
        assert " while(" not in unrolled.as_text()  # the swap is active (fails if JAX's internals moved)
        state, reference = create_state(spec), looped()
    leaves, expected = jax.tree.leaves(state), jax.tree.leaves(reference)
    assert len(leaves) == len(expected) > 10
    for got, want in zip(leaves, expected):
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_swap_is_undone_for_everything_traced_after_it():
    with _unrolled_threefry_on_cpu():
        inside = _bits((4, 5)).as_text()
    after = _bits((4, 5)).as_text()
    assert "while" not in inside and "while" in after
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda: jax.random.bits(jax.random.key(3), (4, 5)))()),
                                  np.asarray(_bits((4, 5)).compile()()))
