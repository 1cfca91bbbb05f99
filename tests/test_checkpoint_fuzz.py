"""Bit flips in a checkpoint's files: each is detected (the step is set aside) or provably harmless.

A tiny checkpoint is written straight from a fresh state (no training); then, one at a time,
random single bits of the newest step's files are flipped (uniformly over all their bytes)
and that step is restored in-process through the same verification `restore_or_init` uses.
Every flip must end as

- detected: the step is reported damaged (resume then falls back to the step before), or
- harmless: the restore returns the state, the iterator states and the config bit for bit as
  written (the flipped byte is not read, or reads back to the same values),

never as a silent restore of changed values, a config error or an unhandled exception.
"""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.conftest import state_spec_on_mesh, tiny_config

FLIPS = 100  # about 0.7 s each; the seed is fixed, so the same positions every run
SMALL = ("mesh.fsdp=1", "model.encoder_layers=1", "model.decoder_layers=1", "checkpoint.keep=10")


def _spec(cfg, devices):
    return state_spec_on_mesh(cfg, devices)


def _host(state) -> list[np.ndarray]:
    """The state's arrays as raw bytes (NaN-safe bitwise comparison)."""
    return [np.atleast_1d(np.asarray(x)).view(np.uint8).copy() for x in jax.tree.leaves(state)]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def _flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _random_state(spec, seed: int):
    """A state of the spec's shapes and shardings filled with random bits' worth of values (no compile)."""
    rng = np.random.default_rng(seed)

    def fill(a, sharding):
        if np.issubdtype(a.dtype, np.floating):
            value = rng.standard_normal(a.shape).astype(a.dtype)
        else:
            value = rng.integers(0, 2**31 - 1, a.shape).astype(a.dtype)
        return jax.device_put(value, sharding)

    return jax.tree.map(fill, spec.abstract, spec.shardings)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Steps 1 and 2 of a one-layer model: random arrays and iterator states, as a save writes them."""
    from trainer.checkpoint import CheckpointManager

    workdir = tmp_path_factory.mktemp("fuzz")
    cfg = tiny_config(workdir, *SMALL)
    spec, mesh, context = _spec(cfg, jax.devices()[:1])
    with context:
        manager = CheckpointManager(cfg, spec, mesh)
        for step in (1, 2):
            state = {**_random_state(spec, step), "step": jax.device_put(np.int32(step), spec.shardings["step"])}
            position = {"version": 1, "slots": {"0": {"next_index": 160 * step, "seed": 12345}}, "batches": 10 * step,
                        "counters": {"examples": 160 * step, "tokens": 1273 * step}}
            manager.save(step, state, position, force=True)
        manager.close()
    return cfg, spec, mesh, context


def _restore(cfg, spec, mesh, context, step):
    """What restore_or_init decides for one step: (items, None), (None, damage), or raises."""
    from trainer.checkpoint import CheckpointManager

    with context:
        manager = CheckpointManager(cfg, spec, mesh)  # a new manager: what a relaunch would read
        try:
            return manager._try_restore(step)
        finally:
            manager.close()


# A failed read leaves Orbax's other pending reads to be collected with an exception each.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_flipped_bit_is_caught_or_harmless(checkpoint):
    from trainer.config import ConfigError

    cfg, spec, mesh, context = checkpoint
    step_dir = Path(cfg.workdir) / "checkpoints" / "2"
    reference, problem = _restore(cfg, spec, mesh, context, 2)
    assert problem is None
    expected = (_host(reference["state"]), reference["data"]["states"], reference["config"])

    # In a fixed order (the data files' names are random): the same flips on every run.
    files = sorted((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: (str(p.parent), p.stat().st_size))
    sizes = np.array([p.stat().st_size for p in files])
    rng = np.random.default_rng(20240610)
    counts = {"detected": 0, "harmless": 0, "silent": 0, "config error": 0, "crash": 0}
    by_file: dict[str, dict[str, int]] = {}
    failures = []
    for position in rng.choice(int(sizes.sum()), size=FLIPS, replace=False):
        index = int(np.searchsorted(np.cumsum(sizes), position, side="right"))
        path, offset, bit = files[index], int(position - (sizes[:index].sum())), int(rng.integers(8))
        _flip(path, offset, bit)
        try:
            restored, problem = _restore(cfg, spec, mesh, context, 2)
            if problem is not None:
                outcome = "detected"
            elif (_same(_host(restored["state"]), expected[0]) and restored["data"]["states"] == expected[1]
                  and restored["config"] == expected[2]):
                outcome = "harmless"
            else:
                outcome = "silent"
        except ConfigError as e:
            outcome, problem = "config error", str(e)
        except Exception as e:  # noqa: BLE001 - counted: the restore path must not raise on damage
            outcome, problem = "crash", f"{type(e).__name__}: {e}"
        finally:
            _flip(path, offset, bit)  # restore the byte for the next flip
        counts[outcome] += 1
        name = str(path.relative_to(step_dir))
        name = "state/ocdbt data" if "/d/" in f"/{name}" else name
        by_file.setdefault(name, dict.fromkeys(counts, 0))[outcome] += 1
        if outcome in ("silent", "config error", "crash"):
            failures.append(f"{path.relative_to(step_dir)} byte {offset} bit {bit}: {outcome} {problem or ''}"[:400])
    report = f"{FLIPS} single-bit flips: " + ", ".join(f"{n} {k}" for k, n in counts.items())
    print("\n" + report)
    for name, c in sorted(by_file.items()):
        print(f"  {name}: " + ", ".join(f"{n} {k}" for k, n in c.items() if n))
    assert counts["silent"] == 0 and counts["config error"] == 0 and counts["crash"] == 0, \
        report + "\n" + "\n".join(failures)
    assert counts["detected"] > FLIPS // 2, report  # most bytes are array data: their flips must show


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_flipped_bit_sets_the_step_aside_and_resumes_from_the_one_before(checkpoint, tmp_path, capsys):
    """End to end through restore_or_init: one bit of array data flipped in the newest step."""
    import shutil

    from trainer.checkpoint import CheckpointManager

    cfg, spec, mesh, context = checkpoint
    workdir = tmp_path / "copy"
    shutil.copytree(cfg.workdir, workdir)
    copy = tiny_config(workdir, *SMALL)
    data_files = sorted((workdir / "checkpoints" / "2" / "state").rglob("d/*"), key=lambda p: -p.stat().st_size)
    _flip(data_files[0], data_files[0].stat().st_size // 2, 3)
    capsys.readouterr()
    with context:
        manager = CheckpointManager(copy, spec, mesh)
        state, states = manager.restore_or_init(lambda s: pytest.fail("should restore step 1"))
        manager.close()
    captured = capsys.readouterr()
    assert f"checkpoint {workdir / 'checkpoints' / '2'} is damaged or incomplete" in captured.err
    # Caught by the array checksums, or earlier by the reader when the flip lands in a compressed
    # chunk's framing (which chunk sits mid-file varies with the order the async writers wrote in).
    assert ("does not match the checksum saved with it" in captured.err
            or "(reading its arrays: " in captured.err), captured.err
    assert f"resuming from checkpoint step 1: {workdir / 'checkpoints' / '1'}" in captured.out
    assert int(state["step"]) == 1 and states[0]["batches"] == 10
    assert (workdir / "checkpoints" / "2.damaged").is_dir() and not (workdir / "checkpoints" / "2").exists()


def test_a_flipped_digit_in_the_iterator_states_is_caught(checkpoint, tmp_path):
    """The data item (JSON) is sealed by a sha256: a changed position never replays silently."""
    import shutil

    cfg, spec, mesh, context = checkpoint
    workdir = tmp_path / "copy"
    shutil.copytree(cfg.workdir, workdir)
    copy = tiny_config(workdir, *SMALL)
    metadata = workdir / "checkpoints" / "2" / "data" / "metadata"
    text = metadata.read_text()
    start = text.index('"next_index": 320') + len('"next_index": ')
    _flip(metadata, start + 1, 0)  # "320" -> "330": still valid JSON, another position
    assert '"next_index": 330' in metadata.read_text()
    json.loads(metadata.read_text())
    restored, problem = _restore(copy, spec, mesh, context, 2)
    assert restored is None and "does not match its sha256" in problem
    os.remove(metadata)  # a missing item is damage as well
    restored, problem = _restore(copy, spec, mesh, context, 2)
    assert restored is None and problem


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_items_skips_a_damaged_step(checkpoint, tmp_path, capsys):
    """The decode/export path verifies the arrays it reads too, and falls back to the step before."""
    import shutil

    from trainer.checkpoint import restore_items

    cfg, spec, mesh, context = checkpoint
    workdir = tmp_path / "copy"
    shutil.copytree(cfg.workdir, workdir)
    target = {"params": spec.restore_target()["params"]}
    with context:
        clean, step = restore_items(str(workdir / "checkpoints"), target)
    assert step == 2
    # One flip in the middle of each data file: the parameters' files are caught, the others
    # (Adam moments, not read for decoding) leave the parameters bit-identical.
    fallbacks = 0
    for data_file in sorted((workdir / "checkpoints" / "2" / "state").rglob("d/*")):
        _flip(data_file, data_file.stat().st_size // 2, 5)
        capsys.readouterr()
        with context:
            params, step = restore_items(str(workdir / "checkpoints"), target)
        _flip(data_file, data_file.stat().st_size // 2, 5)
        if step == 1:
            fallbacks += 1
            assert f"checkpoint {workdir / 'checkpoints' / '2'} could not be restored" in capsys.readouterr().err
            assert not _same(_host(params), _host(clean))  # step 1's values, not step 2's
        else:
            assert step == 2 and _same(_host(params), _host(clean)), data_file
        assert (workdir / "checkpoints" / "2").is_dir()  # reading for decoding never renames anything
    assert fallbacks


def test_checkpoints_from_before_exact_checksums_still_restore(checkpoint, tmp_path):
    """A `data` item with the older float fingerprint (no sha256, no per-array hashes) resumes."""
    import shutil

    from trainer.checkpoint import fingerprint

    cfg, spec, mesh, context = checkpoint
    reference, _ = _restore(cfg, spec, mesh, context, 2)
    workdir = tmp_path / "copy"
    shutil.copytree(cfg.workdir, workdir)
    copy = tiny_config(workdir, *SMALL)
    metadata = workdir / "checkpoints" / "2" / "data" / "metadata"
    new = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({"process_count": 1, "states": new["states"],
                                    "fingerprint": fingerprint(reference["state"])}))
    restored, problem = _restore(copy, spec, mesh, context, 2)
    assert problem is None and restored["data"]["states"] == new["states"]
    assert _same(_host(restored["state"]), _host(reference["state"]))
