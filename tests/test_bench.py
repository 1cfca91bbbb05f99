"""`python -m trainer.bench` runs and reports every figure (values are not asserted: timing)."""

import json
import time

import pytest

from tests.conftest import CONFIGS, run_cli


@pytest.mark.slow
def test_bench_reports_speed_memory_and_pipeline(tmp_path):
    proc = run_cli(["-m", "trainer.bench", str(CONFIGS / "tiny.yaml"), f"workdir={tmp_path}", "bench.steps=3",
                    "bench.pipeline_batches=5", "runtime.cpu_devices=2", "mesh.fsdp=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("bench: "))
    result = json.loads(line[len("bench: "):])
    assert result["devices"] == 2 and result["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    for key in ("compile_s", "step_time_s", "tokens_per_s", "mfu", "pipeline_batches_per_s"):
        assert result[key] > 0, key
    # Parameters + Adam moments, split two ways: exactly what the state holds per device.
    assert result["state_bytes_per_device"] > 0
    assert result["model_gflop_per_step"] == pytest.approx(0.0786432)
    assert "MFU" in proc.stdout and "input pipeline" in proc.stdout
    assert not (tmp_path / "metrics.jsonl").exists()  # the benchmark writes nothing to the workdir


def test_flops_formula_counts_every_matmul():
    from model import ModelConfig
    from trainer.flops import model_flops_per_step

    cfg = ModelConfig(vocab_size=100, vocab_multiple=128, d_model=8, num_heads=2, mlp_dim=16, encoder_layers=1,
                      decoder_layers=1)
    b, li, lt, d, hd, m, v = 1, 4, 3, 8, 8, 16, 128
    enc = 2 * li * d * hd * 4 + 2 * 2 * li * li * hd + 2 * li * d * m * 2
    dec = (2 * lt * d * hd * 4 + 2 * 2 * lt * lt * hd + 2 * lt * d * hd * 2 + 2 * li * d * hd * 2
           + 2 * 2 * lt * li * hd + 2 * lt * d * m * 2)
    logits = 2 * lt * d * v
    assert model_flops_per_step(cfg, b, li, lt) == 3 * (enc + dec + logits)


def test_the_cpu_peak_is_the_fastest_of_about_a_second_of_matmuls():
    """A short burst of load from another process must not set the peak (and so MFU): the
    measurement keeps timing matmuls for at least `min_seconds`, and at most `max_repeats`."""
    from trainer.flops import measure_peak_flops

    start = time.perf_counter()
    peak = measure_peak_flops(n=256, min_seconds=0.3, max_repeats=1_000_000)
    assert time.perf_counter() - start >= 0.3
    assert peak > 0
    start = time.perf_counter()
    measure_peak_flops(n=256, repeats=2, min_seconds=60.0, max_repeats=3)
    assert time.perf_counter() - start < 60.0
