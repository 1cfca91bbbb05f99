"""`trainer.plan`: compile-only fit checks for hardware we do not have, and the search for what fits."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from tests.conftest import CONFIGS, ROOT
from trainer.config import ConfigError
from trainer.plan import GIB, candidates, compile_step, parse_target, plan

TINY = [str(CONFIGS / "tiny.yaml"), "mesh.fsdp=-1"]


def test_targets_parse_with_device_counts_and_memory():
    t = parse_target("tpu:v5e:8x8")
    assert (t.kind, t.devices, t.memory_bytes, t.exact) == ("tpu", 64, 16 * GIB, True)
    assert parse_target("tpu:v5e:4x4x2slices").devices == 32 and parse_target("tpu:v5e:4x4x2slices").slices == 2
    assert parse_target("tpu:v4:4x4x4").devices == 64
    g = parse_target("gpu:h100x16")
    assert (g.kind, g.devices, g.memory_bytes, g.exact) == ("gpu", 16, 80 * 10**9, False)
    assert parse_target("gpu:a100-40x8", memory_gb=20).memory_bytes == 20 * 10**9
    for bad in ("tpu:v9:8x8", "gpu:h100", "v5e-16", "gpu:h100x16x2"):
        with pytest.raises(ConfigError, match="target="):
            parse_target(bad)


def test_candidates_come_cheapest_first():
    from trainer.config import load_config

    order = candidates(load_config(TINY + ["train.batch_size=32"]), 8)
    assert order[0] in ({"model.remat": "minimal"}, {"train.grad_accum_steps": 2},
                        {"mesh.tensor": 2, "mesh.fsdp": -1})
    kinds = [{k for k in c if k != "mesh.fsdp"} for c in order]
    assert all(len(k) == 1 for k in kinds[:3])  # single changes before combinations
    assert kinds[-1] == {"model.remat", "mesh.tensor", "train.grad_accum_steps"}


def test_the_search_prints_the_cheapest_configuration_that_fits(capsys):
    """On 8 simulated devices (gpu:h100x8's simulation): a memory limit between the configured step's
    peak and the peak with 4-step gradient accumulation makes the search find an accumulation."""
    from trainer.config import load_config

    devices = jax.devices()[:8]
    target = parse_target("gpu:h100x8")
    args = TINY + ["train.batch_size=64", "data.inputs_length=64", "data.targets_length=64"]
    base = compile_step(load_config(args), target, devices)
    accum = compile_step(load_config(args + ["train.grad_accum_steps=4"]), target, devices)
    assert base["fits"] and accum["peak"] < base["peak"]
    limit = (base["peak"] + accum["peak"]) / 2 / 10**9
    assert plan(args, parse_target("gpu:h100x8", memory_gb=limit), search=True, devices=devices) == 0
    out = capsys.readouterr().out
    assert "does not fit as configured" in out and "estimate (CPU compile" in out
    answer = out.rsplit("fits (peak", 1)[1].splitlines()[1].split()
    assert any(a.startswith("train.grad_accum_steps=") for a in answer), out
    assert "(as configured)" in out and "configuration" in out  # the table of what was tried

    assert plan(args, parse_target("gpu:h100x8", memory_gb=1e-6), search=False, devices=devices) == 1
    assert "nothing tried fits" in capsys.readouterr().out


def _plan_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "trainer.plan", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_gpu_target_cli_reports_state_bytes_on_a_simulated_mesh():
    r = _plan_cli(*TINY, "target=gpu:h100x8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fits as configured" in r.stdout and "{'data': 1, 'fsdp': 8, 'tensor': 1}" in r.stdout
    r = _plan_cli(*TINY, "target=gpu:h100")
    assert r.returncode == 2 and r.stderr.startswith("error: target=gpu:h100")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[plan]'): no TPU compiler on this host")
def test_tpu_target_compiles_with_the_tpu_compiler():
    r = _plan_cli(*TINY, "target=tpu:v5e:2x2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exact (TPU compiler)" in r.stdout and "fits as configured" in r.stdout
    assert "{'data': 1, 'fsdp': 4, 'tensor': 1}" in r.stdout
    # XLA's compile-time OOM (a 4096 x 512-token batch through a 32k vocabulary) is a row, not a traceback.
    r = _plan_cli(*TINY, "target=tpu:v5e:2x2", "search=false", "train.batch_size=4096", "data.inputs_length=512",
                  "data.targets_length=512", "model.vocab_size=32000")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "compile-time OOM: HLO temporaries" in r.stdout and "> available HBM" in r.stdout, r.stdout[-2000:]
    # Two slices: the slices must be declared; then data crosses them and fsdp stays inside.
    r = _plan_cli(*TINY, "target=tpu:v5e:2x2x2slices")
    assert r.returncode == 2 and "set mesh.dcn_data" in r.stderr, r.stderr[-2000:]
    r = _plan_cli(*TINY, "target=tpu:v5e:2x2x2slices", "mesh.data=2", "mesh.dcn_data=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "{'data': 2, 'fsdp': 4, 'tensor': 1}" in r.stdout and "fits as configured" in r.stdout


def _check_multislice_mesh() -> None:
    """2 slices of v5e 2x2: `data` spans both slices, every fsdp/tensor group lies inside one."""
    from jax.experimental import topologies

    from sharding.mesh import MeshError, make_mesh

    devices = list(topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu", num_slices=2).devices)
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "dcn_data": 2}, devices)
    grid = mesh.devices  # [data, fsdp, tensor]
    for i in range(grid.shape[0]):
        assert len({d.slice_index for d in grid[i].flat}) == 1  # one data index: one slice
    for j in range(grid.shape[1]):
        for k in range(grid.shape[2]):
            assert {d.slice_index for d in grid[:, j, k]} == {0, 1}  # data crosses the slices
    for sizes, message in (({"data": 1, "fsdp": 8, "tensor": 1}, "form 2 TPU slices: set mesh.dcn_data"),
                           ({"data": 4, "fsdp": 2, "tensor": 1, "dcn_data": 4},
                            "mesh.dcn_data * mesh.dcn_fsdp = 4 but the devices form 2 slice"),
                           ({"data": 8, "fsdp": 1, "tensor": 1, "dcn_fsdp": 2},
                            "mesh.dcn_fsdp=2 does not divide mesh.fsdp=1")):
        try:
            make_mesh(sizes, devices)
        except MeshError as e:
            assert message in str(e), str(e)
        else:
            raise AssertionError(f"{sizes} should be refused")
    print("multislice ok")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[plan]'): no TPU topology to build")
def test_multislice_mesh_keeps_fsdp_and_tensor_inside_a_slice():
    # In a subprocess: libtpu loaded into the test worker breaks jax.profiler in later tests.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", "from tests.test_plan import _check_multislice_mesh as c; c()"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "multislice ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
