"""`python -m trainer.decode [CONFIG.yaml] workdir=RUN input=FILE|- [output=FILE] [key=value ...]`.

Decodes text with a trained run: loads `RUN/config.yaml` (or CONFIG.yaml), the run's tokenizer
and the parameters of its latest checkpoint (or `checkpoint_step=N`), reads one source per line
and writes one output per line, in input order (to `output=FILE`, default stdout), in batches
of `decode.batch_size` on the mesh. Search settings are `decode.*` overrides
(`decode.beam_size=4`, `decode.max_length=64`, `decode.temperature=0.8 decode.top_p=0.9`, ...).

Lines: an empty line gives an empty output line; a line that is not valid UTF-8 (or, for a
synthetic-data run, not space-separated token ids) is reported on stderr with its line number
and skipped, and an empty output line keeps the output aligned with the input. Sources longer
than `data.inputs_length` tokens (EOS included) are truncated like in training. Newlines inside
an output (a tokenizer can produce them) are written as the two characters `\\n`.

Exit codes: 0 on success, 2 for a user error (configuration, a workdir without checkpoints, an
input or output path that cannot be used): one line on stderr.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from trainer import storage
from trainer.checkpoint import committed_steps, restore_items
from trainer.config import Config, ConfigError, load_config, parse_overrides
from trainer.data.vocab import EOS_ID
from trainer.run import Run
from trainer.step import jit_generate
from trainer.text import ids_to_text, pack_sources, text_to_ids, to_host
from trainer.workdir import unwritable_reason

# Command-line keys of this command that are not config keys.
_COMMAND_KEYS = ("input", "output", "checkpoint_step")


@dataclasses.dataclass
class Line:
    """One input line: the text to decode, or why it is skipped (`error`)."""

    number: int  # 1-based
    text: str | None
    error: str | None = None


def read_lines(data: bytes) -> list[Line]:
    """Splits raw input into lines (\\n or \\r\\n); a final newline does not start a new line."""
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines = []
    for i, chunk in enumerate(raw, start=1):
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
        try:
            lines.append(Line(i, chunk.decode("utf-8")))
        except UnicodeDecodeError as e:
            lines.append(Line(i, None, f"invalid UTF-8 at byte {e.start}"))
    return lines


def parse_args(argv: list[str]) -> tuple[Any, dict[str, Any]]:
    """The run's config (RUN/config.yaml + overrides) and this command's own options."""
    path, nested = parse_overrides(argv)
    # This command's own keys, as written (YAML would read `input=-` as a list).
    options: dict[str, Any] = {}
    for arg in argv:
        key, _, text = arg.partition("=")
        if key in _COMMAND_KEYS:
            options[key] = text
            nested.pop(key, None)
    if "input" not in options or options["input"] in (None, ""):
        raise ConfigError("missing `input=FILE` (or `input=-` for stdin)")
    workdir = nested.get("workdir")
    if not workdir:
        raise ConfigError("missing `workdir=RUN`: the training run whose checkpoint decodes")
    if path is None:
        path = storage.join(str(workdir), "config.yaml")
        if not storage.isfile(path):
            raise ConfigError(f"{path} not found: is workdir={workdir} a training run? (or pass its CONFIG.yaml)")
    if "checkpoint_step" in options:
        step = options["checkpoint_step"]
        if not step.isdigit():
            raise ConfigError(f"checkpoint_step must be a step number, got {step!r}")
        options["checkpoint_step"] = int(step)
    config_args = [a for a in argv if "=" in a and a.partition("=")[0] not in _COMMAND_KEYS]
    cfg = load_config(config_args, path=path)
    return cfg, options


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, options = parse_args(argv)
        directory = storage.absolute(storage.join(cfg.workdir, "checkpoints"))
        steps = committed_steps(directory)
        if not steps:
            raise ConfigError(f"no checkpoints in {directory}: train the run first (python -m trainer.train ... "
                              f"workdir={cfg.workdir}) with checkpoint.every > 0 or checkpoint.save_final=true")
        wanted = options.get("checkpoint_step")
        if wanted is not None and wanted not in steps:
            raise ConfigError(f"checkpoint_step={wanted}: no such checkpoint in {directory} "
                              f"(steps: {', '.join(map(str, steps))})")
        check_paths(options)
        return decode(cfg, options, directory, steps)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def check_paths(options: dict[str, Any]) -> None:
    """`input=` must be a readable file (or `-`), `output=` a file path whose folder can be written."""
    source = str(options["input"])
    if source != "-":
        storage.check(source)
        if storage.isdir(source):
            raise ConfigError(f"input={source} is a directory; give a file with one source per line (or input=-)")
        if not storage.isfile(source):
            raise ConfigError(f"input={source}: file not found")
        if not storage.is_remote(source) and not os.access(source, os.R_OK):
            raise ConfigError(f"input={source}: file is not readable")
    out = options.get("output")
    if out in (None, "", "-"):
        return
    out = str(out)
    if storage.is_remote(out):
        storage.check(out)
        if out.endswith("/") or storage.isdir(out):
            raise ConfigError(f"output={out} is a directory; give the path of the file to write")
        return
    if os.path.isdir(out) or out.endswith(os.sep):
        raise ConfigError(f"output={out} is a directory; give the path of the file to write")
    reason = unwritable_reason(os.path.dirname(os.path.abspath(out)))
    if reason is not None:
        raise ConfigError(f"output={out}: {reason}")


def decode(cfg: Config, options: dict[str, Any], directory: str, steps: list[int]) -> int:
    run = Run.from_config(cfg)
    is_main = jax.process_index() == 0

    def log(message: str) -> None:
        if is_main:
            print(message, file=sys.stderr, flush=True)

    # The same vocabulary (and padding) as training, so the parameter shapes match.
    run, tokenizer = run.with_run_tokenizer()
    cfg = run.cfg
    max_length = cfg.decode.max_length or cfg.data.targets_length  # the config checked it against the model
    rows_multiple = run.batch_ways * jax.process_count()
    batch_size = -(-cfg.decode.batch_size // rows_multiple) * rows_multiple

    # Input: read and tokenize everything first (bad lines are reported before any compile).
    source = options["input"]
    data = sys.stdin.buffer.read() if source == "-" else storage.read_bytes(str(source))
    lines = read_lines(data)
    encoded: dict[int, np.ndarray] = {}
    for i, line in enumerate(lines):
        if line.error is None and line.text.strip():
            try:
                encoded[i] = text_to_ids(line.text, tokenizer, cfg.model.vocab_size)
            except ValueError as e:
                line.error = str(e)
    for line in lines:
        if line.error:
            log(f"line {line.number}: {line.error}; skipped (an empty output line keeps the alignment)")
    order = sorted(encoded, key=lambda i: len(encoded[i]))  # similar lengths together: earlier stops
    rows, truncated = pack_sources([encoded[i] for i in order], cfg.data.inputs_length)
    if truncated:
        log(f"{truncated} source(s) longer than data.inputs_length={cfg.data.inputs_length} tokens were truncated")

    outputs = [""] * len(lines)
    with run.context():
        spec = run.params_spec()
        restored, step = restore_items(directory, {"params": spec.restore_target()}, options.get("checkpoint_step"))
        params = restored["params"]
        log(f"decoding with checkpoint step {step} ({storage.join(directory, str(step))}); {cfg.decode.mode}, "
            f"max_length {max_length}, batch {batch_size} on mesh {dict(run.mesh.shape)}")
        inputs_sharding = run.batch_sharding
        generate = jit_generate(spec.graphdef, cfg.decode, max_length=max_length,
                                param_shardings=spec.shardings, batch_sharding=inputs_sharding)
        num_batches = -(-len(order) // batch_size)
        progress = _progress(num_batches, enabled=is_main and num_batches > 1)
        generated_tokens = 0
        start = None
        for b in range(num_batches):
            chunk = rows[b * batch_size:(b + 1) * batch_size]
            full = np.zeros((batch_size, rows.shape[1]), np.int32)
            full[: len(chunk)] = chunk
            inputs = jax.make_array_from_callback(full.shape, inputs_sharding, lambda idx: full[idx])
            # Sampling: a different key per batch, fixed by decode.seed.
            tokens, _ = generate(params, inputs, cfg.decode.seed * 1_000_003 + b)
            tokens = to_host(tokens)
            if start is None:  # the first batch compiles: time from its end
                start, timed_tokens = time.perf_counter(), 0
            else:
                timed_tokens += int(np.sum(_generated_lengths(tokens[: len(chunk)])))
            generated_tokens += int(np.sum(_generated_lengths(tokens[: len(chunk)])))
            for r in range(len(chunk)):
                text = ids_to_text(tokens[r], tokenizer)
                outputs[order[b * batch_size + r]] = text.replace("\r", "\\r").replace("\n", "\\n")
            progress.update(1)
        progress.close()
        elapsed = time.perf_counter() - start if start is not None else 0.0
        rate = f"; {timed_tokens / elapsed:,.0f} tokens/s after the first (compiling) batch" if (
            num_batches > 1 and elapsed > 0) else ""
        log(f"decoded {len(order)} line(s) into {generated_tokens} tokens in {num_batches} batch(es){rate}")

    if is_main:
        text = "".join(o + "\n" for o in outputs)
        if options.get("output") in (None, "", "-"):
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            out = str(options["output"])
            write_output(out, text)
            log(f"wrote {len(outputs)} line(s) to {out}")
    return 0


def write_output(out: str, text: str) -> None:
    """Writes `out` atomically (a local temporary file + rename, or one object upload); a failure leaves
    no temporary file behind."""
    try:
        storage.write_text(out, text)
    except OSError as e:
        raise ConfigError(f"output={out}: cannot write it ({e.strerror or e})") from None


def _generated_lengths(tokens: np.ndarray) -> np.ndarray:
    """Tokens generated per row, EOS included (the whole row when there is no EOS)."""
    is_eos = tokens == EOS_ID
    has = is_eos.any(axis=1)
    return np.where(has, is_eos.argmax(axis=1) + 1, tokens.shape[1])


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    return tqdm(total=total, unit="batch", desc="decoding", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
