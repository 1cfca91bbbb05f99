"""Every user error of every command is one line on stderr, exit code 2, no traceback, and the
workdir untouched.

The table is run in-process (`main([...])` with capsys) where the error comes from the config or
the command line, which is cheap; a representative subset, one or more per command, runs as real
subprocesses (`python -m ...`), which also covers the errors that change process-wide JAX state
(`runtime.platform`, `distributed.*`).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, run_cli

TINY = str(CONFIGS / "tiny.yaml")
DEFAULT = str(CONFIGS / "default.yaml")
UNWRITABLE = "/proc/1"  # not writable, even for root


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Files the bad inputs point at: a plain file, a directory, an empty and a non-mapping config, a
    tiny TSV corpus, a fake finished run (config + a checkpoint folder) and one without checkpoints."""
    from trainer.config import dump_yaml, load_config

    root = tmp_path_factory.mktemp("cli_errors")
    (root / "file.txt").write_text("not a directory\n")
    (root / "adir").mkdir()
    (root / "empty.yaml").write_text("")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "small.tsv").write_text("".join(f"hello world {i}\tbonjour monde {i}\n" for i in range(50)))
    (root / "src.txt").write_text("4 5 6\n")
    for name, checkpoints in (("run", True), ("untrained", False)):
        run = root / name
        run.mkdir()
        (run / "config.yaml").write_text(dump_yaml(load_config([TINY, f"workdir={run}"])))
        if checkpoints:
            (run / "checkpoints" / "2").mkdir(parents=True)
    (root / "exported").mkdir()
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# (id, command, arguments, what the message must name). `{P}` is the `paths` folder, `{W}` a fresh
# workdir that must still not exist afterwards.
CASES = [
    # ---- train: keys, types and values (the config)
    ("unknown-key", "train", [TINY, "workdir={W}", "train.stepz=3"], "train.stepz"),
    ("wrong-type", "train", [TINY, "workdir={W}", "train.steps=many"], "train.steps"),
    ("steps-negative", "train", [TINY, "workdir={W}", "train.steps=-1"], "train.steps"),
    ("batch-zero", "train", [TINY, "workdir={W}", "train.batch_size=0"], "train.batch_size"),
    ("lr-inf", "train", [TINY, "workdir={W}", "train.learning_rate=.inf"], "train.learning_rate"),
    ("lr-zero", "train", [TINY, "workdir={W}", "train.learning_rate=0"], "train.learning_rate"),
    ("adam-eps-zero", "train", [TINY, "workdir={W}", "train.adam_eps=0"], "train.adam_eps"),
    ("adam-b1-two", "train", [TINY, "workdir={W}", "train.adam_b1=2"], "train.adam_b1"),
    ("adam-b2-negative", "train", [TINY, "workdir={W}", "train.adam_b2=-0.1"], "train.adam_b2"),
    ("clip-negative", "train", [TINY, "workdir={W}", "train.grad_clip_norm=-1"], "train.grad_clip_norm"),
    ("decay-negative", "train", [TINY, "workdir={W}", "train.weight_decay=-1"], "train.weight_decay"),
    ("eval-batches-negative", "train", [TINY, "workdir={W}", "train.eval_batches=-1"], "train.eval_batches"),
    ("end-lr-ratio", "train", [TINY, "workdir={W}", "train.end_learning_rate_ratio=1.5"],
     "train.end_learning_rate_ratio"),
    ("label-smoothing-one", "train", [TINY, "workdir={W}", "train.label_smoothing=1"], "train.label_smoothing"),
    ("keep-period-negative", "train", [TINY, "workdir={W}", "checkpoint.keep_period=-1"], "checkpoint.keep_period"),
    ("keep-zero", "train", [TINY, "workdir={W}", "checkpoint.keep=0"], "checkpoint.keep"),
    ("seed-negative", "train", [TINY, "workdir={W}", "seed=-1"], "seed"),
    ("seed-huge", "train", [TINY, "workdir={W}", f"seed={2**70}"], "seed"),
    ("learned-positions-short", "train", [TINY, "workdir={W}", "model.positions=learned", "model.max_length=4"],
     "model.max_length"),
    ("decode-max-length-huge", "train", [TINY, "workdir={W}", "decode.max_length=100000"], "decode.max_length"),
    ("norm-eps-nan", "train", [TINY, "workdir={W}", "model.norm_eps=.nan"], "model.norm_eps"),
    ("model-vocab-zero", "train", [TINY, "workdir={W}", "model.vocab_size=0"], "model.vocab_size"),
    ("synthetic-needs-vocab", "train", [TINY, "workdir={W}", "model.vocab_size=null"], "model.vocab_size"),
    ("noise-span-inf", "train", [TINY, "workdir={W}", "data.mean_noise_span_length=.inf"],
     "data.mean_noise_span_length"),
    ("eval-fraction-one", "train", [TINY, "workdir={W}", "data.eval_fraction=1"], "data.eval_fraction"),
    ("inputs-length-one", "train", [TINY, "workdir={W}", "data.inputs_length=1"], "data.inputs_length"),
    ("cpu-devices-zero", "train", [TINY, "workdir={W}", "runtime.cpu_devices=0"], "runtime.cpu_devices"),
    ("mesh-zero", "train", [TINY, "workdir={W}", "mesh.data=0"], "mesh.data"),
    ("init-timeout-zero", "train", [TINY, "workdir={W}", "distributed.initialization_timeout=0"],
     "distributed.initialization_timeout"),
    ("top-p-zero", "train", [TINY, "workdir={W}", "decode.top_p=0", "decode.temperature=1"], "decode.top_p"),
    ("decode-seed-negative", "train", [TINY, "workdir={W}", "decode.seed=-1"], "decode.seed"),
    ("temperature-negative", "train", [TINY, "workdir={W}", "decode.temperature=-1"], "decode.temperature"),
    ("no-eval-data", "train", [DEFAULT, "workdir={W}", "data.tokenizer=bytes", "data.eval_fraction=0"],
     "data.eval_fraction"),
    ("too-few-sentinels", "train", [DEFAULT, "workdir={W}", "data.num_sentinels=2"], "data.num_sentinels"),
    # ---- train: files and folders
    ("workdir-is-a-file", "train", [TINY, "workdir={P}/file.txt"], "workdir"),
    ("workdir-under-a-file", "train", [TINY, "workdir={P}/file.txt/run"], "workdir"),
    ("workdir-unwritable", "train", [TINY, f"workdir={UNWRITABLE}/run"], "workdir"),
    ("config-empty", "train", ["{P}/empty.yaml", "workdir={W}"], "empty.yaml"),
    ("config-not-a-mapping", "train", ["{P}/list.yaml", "workdir={W}"], "list.yaml"),
    ("config-missing", "train", ["{P}/nope.yaml", "workdir={W}"], "nope.yaml"),
    ("config-is-a-directory", "train", ["{P}/adir", "workdir={W}"], "is a directory"),
    # ---- train: found once the data is known (after start-up, before any compile)
    ("vocab-mismatch", "train", [DEFAULT, "workdir={W}", "data.tokenizer=bytes", "model.vocab_size=4096"],
     "model.vocab_size"),
    ("spm-vocab-too-large", "train", [DEFAULT, "workdir={W}", "data.source=tsv", "data.path={P}/small.tsv"],
     "data.vocab_size=384"),
    ("tsv-missing", "train", [TINY, "workdir={W}", "data.source=tsv", "data.path={P}/nope.tsv",
                              "model.vocab_size=null"], "nope.tsv"),
    # ---- decode
    ("decode-no-input", "decode", ["workdir={P}/run"], "input"),
    ("decode-no-workdir", "decode", ["input={P}/src.txt"], "workdir"),
    ("decode-not-a-run", "decode", ["workdir={P}/adir", "input={P}/src.txt"], "config.yaml"),
    ("decode-input-directory", "decode", ["workdir={P}/run", "input={P}/adir"], "input={P}/adir"),
    ("decode-input-missing", "decode", ["workdir={P}/run", "input={P}/nope.txt"], "nope.txt"),
    ("decode-output-directory", "decode", ["workdir={P}/run", "input={P}/src.txt", "output={P}/adir"],
     "output={P}/adir"),
    ("decode-output-under-a-file", "decode", ["workdir={P}/run", "input={P}/src.txt",
                                              "output={P}/file.txt/out.txt"], "output="),
    ("decode-step-not-a-number", "decode", ["workdir={P}/run", "input={P}/src.txt", "checkpoint_step=abc"],
     "checkpoint_step"),
    ("decode-step-missing", "decode", ["workdir={P}/run", "input={P}/src.txt", "checkpoint_step=7"],
     "checkpoint_step=7"),
    ("decode-no-checkpoints", "decode", ["workdir={P}/untrained", "input={P}/src.txt"], "no checkpoints"),
    ("decode-max-length", "decode", ["workdir={P}/run", "input={P}/src.txt", "decode.max_length=100000"],
     "decode.max_length"),
    ("decode-beam-zero", "decode", ["workdir={P}/run", "input={P}/src.txt", "decode.beam_size=0"],
     "decode.beam_size"),
    ("decode-empty-run-config", "decode", ["{P}/empty.yaml", "workdir={P}/run", "input={P}/src.txt"], "empty.yaml"),
    # ---- export
    ("export-no-workdir", "export", [], "workdir"),
    ("export-dtype", "export", ["workdir={P}/run", "dtype=float16"], "dtype"),
    ("export-step-not-a-number", "export", ["workdir={P}/run", "checkpoint_step=x"], "checkpoint_step"),
    ("export-step-missing", "export", ["workdir={P}/run", "checkpoint_step=9"], "checkpoint_step=9"),
    ("export-output-exists", "export", ["workdir={P}/run", "output={P}/exported"], "output={P}/exported"),
    ("export-no-checkpoints", "export", ["workdir={P}/untrained"], "no checkpoints"),
    ("export-not-a-run", "export", ["workdir={P}/adir"], "config.yaml"),
    # ---- bench
    ("bench-steps-not-a-number", "bench", [TINY, "workdir={W}", "bench.steps=abc"], "bench.steps"),
    ("bench-steps-zero", "bench", [TINY, "workdir={W}", "bench.steps=0"], "bench.steps"),
    ("bench-config", "bench", [TINY, "workdir={W}", "train.batch_size=0"], "train.batch_size"),
    # ---- prepare
    ("prepare-no-out", "prepare", ["data.source=tsv", "data.path={P}/small.tsv"], "--out"),
    ("prepare-workers-negative", "prepare", ["--out", "{W}", "--workers", "-1"], "--workers"),
    ("prepare-workers-not-a-number", "prepare", ["--out", "{W}", "--workers", "two"], "--workers"),
    ("prepare-shard-size-zero", "prepare", ["--out", "{W}", "--records-per-shard", "0"], "--records-per-shard"),
    ("prepare-out-is-a-file", "prepare", ["--out", "{P}/file.txt"], "--out"),
    ("prepare-synthetic", "prepare", ["--out", "{W}", TINY], "data.source"),
    ("prepare-tsv-missing", "prepare", ["--out", "{W}", "data.source=tsv", "data.path={P}/nope.tsv"], "nope.tsv"),
    ("prepare-config", "prepare", ["--out", "{W}", "data.noise_density=2"], "data.noise_density"),
    # ---- launch.local (nothing is started)
    ("launch-no-processes", "launch", ["--", TINY, "workdir={W}"], "--processes"),
    ("launch-zero-processes", "launch", ["--processes", "0", "--", TINY, "workdir={W}"], "--processes"),
    ("launch-zero-devices", "launch", ["-n", "2", "-k", "0", "--", TINY, "workdir={W}"], "--devices-per-process"),
    ("launch-bad-port", "launch", ["-n", "2", "--port", "70000", "--", TINY, "workdir={W}"], "--port"),
    ("launch-negative-grace", "launch", ["-n", "2", "--grace", "-1", "--", TINY, "workdir={W}"], "--grace"),
    ("launch-unknown-module", "launch", ["-n", "2", "--module", "no.such.module"], "no.such.module"),
    ("launch-trainer-config", "launch", ["-n", "2", "--", TINY, "workdir={W}", "train.steps=-1"], "train.steps"),
    ("launch-trainer-workdir", "launch", ["-n", "2", "--", TINY, "workdir={P}/file.txt"], "workdir"),
]

# Run as real subprocesses too: at least one per command, and the errors that touch process-wide
# JAX state (platform, distributed start-up) only run this way.
SUBPROCESS_ONLY = [
    ("platform-missing", "train", [TINY, "workdir={W}", "runtime.platform=tpu"], "runtime.platform"),
    ("distributed-on-alone", "train", [TINY, "workdir={W}", "distributed.enabled=on"], "distributed.coordinator"),
    ("coordinator-alone", "train", [TINY, "workdir={W}", "distributed.coordinator=127.0.0.1:1234"],
     "distributed.num_processes"),
]
SUBPROCESS_ALSO = ["seed-huge", "lr-inf", "workdir-is-a-file", "config-empty", "vocab-mismatch",
                   "decode-input-directory", "decode-output-directory", "export-dtype", "export-no-checkpoints",
                   "bench-steps-not-a-number", "prepare-workers-negative", "prepare-no-out",
                   "launch-zero-processes", "launch-trainer-config"]

MODULES = {"train": "trainer.train", "decode": "trainer.decode", "export": "trainer.export",
           "bench": "trainer.bench", "prepare": "trainer.prepare", "launch": "launch.local"}


def _fill(args, paths, workdir):
    return [a.replace("{P}", str(paths)).replace("{W}", str(workdir)) for a in args]


def _check(case_id, code, stderr, expected, paths, workdir, before):
    assert "Traceback" not in stderr, f"{case_id}: {stderr}"
    assert code == 2, f"{case_id}: exit code {code}; stderr: {stderr}"
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, f"{case_id}: the error must be one line: {stderr!r}"
    assert expected.replace("{P}", str(paths)) in errors[0], f"{case_id}: {errors[0]!r} does not name {expected!r}"
    assert not workdir.exists(), f"{case_id}: the workdir {workdir} was created"
    assert _snapshot(paths) == before, f"{case_id}: files under {paths} changed"


def _main(command):
    import importlib

    return importlib.import_module(MODULES[command]).main


@pytest.mark.parametrize("case_id,command,args,expected", CASES, ids=[c[0] for c in CASES])
def test_user_error_in_process(case_id, command, args, expected, paths, tmp_path, capsys):
    workdir = tmp_path / "fresh"
    before = _snapshot(paths)
    try:
        code = _main(command)(_fill(args, paths, workdir))
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    _check(case_id, code, captured.err, expected, paths, workdir, before)


def test_the_table_is_long_and_covers_every_command():
    assert len(CASES) + len(SUBPROCESS_ONLY) >= 40
    assert {c[1] for c in CASES} == set(MODULES)
    assert {c[1] for c in CASES if c[0] in SUBPROCESS_ALSO} == set(MODULES)


SUBPROCESS_CASES = SUBPROCESS_ONLY + [c for c in CASES if c[0] in SUBPROCESS_ALSO]


@pytest.mark.slow
@pytest.mark.parametrize("case_id,command,args,expected", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_user_error_as_a_command(case_id, command, args, expected, paths, tmp_path):
    workdir = tmp_path / "fresh"
    before = _snapshot(paths)
    proc = run_cli(["-m", MODULES[command], *_fill(args, paths, workdir)], timeout=300,
                   env={"JAX_PLATFORMS": ""} if case_id == "platform-missing" else None)
    _check(case_id, proc.returncode, proc.stderr, expected, paths, workdir, before)
    assert "Traceback" not in proc.stdout


def test_decode_output_failure_leaves_no_temporary_file(tmp_path):
    """Writing the outputs fails (the target turned into a directory after the start-up checks): one
    error naming it, and no stray `OUT.tmp.PID` beside it."""
    from trainer.config import ConfigError
    from trainer.decode import check_paths, write_output

    target = tmp_path / "out.txt"
    check_paths({"input": "-", "output": str(target)})  # fine while it does not exist
    target.mkdir()
    with pytest.raises(ConfigError, match=r"output=.*out\.txt"):
        write_output(str(target), "a\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    write_output(str(tmp_path / "ok.txt"), "a\n")
    assert (tmp_path / "ok.txt").read_text() == "a\n"


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "wrapped"])
def test_disk_full_is_one_line_with_the_path_and_bytes(tmp_path, capsys, monkeypatch, wrapped):
    """ENOSPC while training (a checkpoint or metrics write), also when a library wraps it: exit 5."""
    import trainer.train as train_module

    path = tmp_path / "checkpoints" / "10" / "state"

    def full(cfg, **kwargs):
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if not wrapped:
            raise error
        try:
            raise error
        except OSError as e:
            raise RuntimeError("checkpoint save failed") from e

    monkeypatch.setattr(train_module, "train", full)
    code = train_module.main([TINY, f"workdir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == train_module.EXIT_DISK_FULL == 5
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and "bytes free" in err


def test_other_errors_still_raise(tmp_path, monkeypatch):
    """Only ENOSPC is turned into a message: a bug keeps its traceback."""
    import trainer.train as train_module

    def broken(cfg, **kwargs):
        raise OSError(errno.EIO, "I/O error", "x")

    monkeypatch.setattr(train_module, "train", broken)
    with pytest.raises(OSError):
        train_module.main([TINY, f"workdir={tmp_path}"])


def test_nonfinite_stop_is_one_line_exit_4(tmp_path, capsys, monkeypatch):
    import trainer.train as train_module

    def diverged(cfg, **kwargs):
        raise FloatingPointError("non-finite loss or gradient at step 3")

    monkeypatch.setattr(train_module, "train", diverged)
    assert train_module.main([TINY, f"workdir={tmp_path}"]) == train_module.EXIT_NONFINITE == 4
    err = capsys.readouterr().err
    assert err.strip() == "error: non-finite loss or gradient at step 3"
