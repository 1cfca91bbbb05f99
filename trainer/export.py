"""`python -m trainer.export workdir=RUN [format=orbax|hf] [output=DIR] [dtype=bfloat16] [checkpoint_step=N]
[max_shard_size=5GB]`.

Writes a run's parameters alone (no optimizer state), optionally cast to bfloat16. `format=orbax`
(the default): a standalone Orbax checkpoint for inference, with the model config beside it:

    DIR/params/       Orbax StandardCheckpointer directory (the `params` tree)
    DIR/model.json    the model config (sizes, dtypes, padded vocabulary)
    DIR/config.yaml   the run's resolved config

`format=hf` (T5-architecture models): a Hugging Face T5 checkpoint that `transformers` and anything
reading the Hub format load: `config.json`, `model.safetensors` in PyTorch naming and layout (numbered
shards plus `model.safetensors.index.json` above `max_shard_size`), `generation_config.json`, and the
run's `spiece.model` when it has a SentencePiece tokenizer. The tables keep every row of
`model.vocab_size` rounded up to `model.vocab_multiple` (T5's own checkpoints have 32,128 rows for
32,100 ids); `transformers` does not mask the rows past the tokenizer, which a trained model never
predicts.

The output folder must not exist yet: an export never overwrites anything.

Exit codes: 0 on success, 2 for a user error (one line on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from trainer import storage
from trainer.checkpoint import committed_steps, orbax_directory, restore_items, temporary_path_class
from trainer.config import Config, ConfigError, dump_yaml, load_config, run_command, split_command_options
from trainer.run import Run
from trainer.workdir import unwritable_reason

_COMMAND_KEYS = ("output", "dtype", "checkpoint_step", "format", "max_shard_size")


def parse_args(argv: list[str]) -> tuple[Any, dict[str, str]]:
    options, rest = split_command_options(argv, _COMMAND_KEYS)
    workdir = next((a.partition("=")[2] for a in rest if a.startswith("workdir=")), None)
    if not workdir:
        raise ConfigError("missing `workdir=RUN`: the training run to export")
    config_path = storage.join(workdir, "config.yaml")
    if not any("=" not in a for a in rest) and not storage.isfile(config_path):
        raise ConfigError(f"{config_path} not found: is workdir={workdir} a training run?")
    cfg = load_config(rest, path=None if any("=" not in a for a in rest) else config_path)
    if options.get("dtype", "float32") not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be float32 or bfloat16, got {options['dtype']!r}")
    if options.get("format", "orbax") not in ("orbax", "hf"):
        raise ConfigError(f"format must be orbax or hf, got {options['format']!r}")
    if "max_shard_size" in options:
        options["max_shard_bytes"] = parse_size(options["max_shard_size"])
    if options.get("format") == "hf":
        from trainer.hf_config import hf_config

        hf_config(cfg.model, 0)  # a model without a T5 equivalent fails here, before any restore
    if "checkpoint_step" in options and not options["checkpoint_step"].isdigit():
        raise ConfigError(f"checkpoint_step must be a step number, got {options['checkpoint_step']!r}")
    # Everything that can be checked without devices, so a mistake never costs a restore.
    directory = storage.absolute(storage.join(cfg.workdir, "checkpoints"))
    steps = committed_steps(directory)
    if not steps:
        raise ConfigError(f"no checkpoints in {directory}: train the run first (checkpoint.save_final=true "
                          "or checkpoint.every > 0)")
    if "checkpoint_step" in options and int(options["checkpoint_step"]) not in steps:
        raise ConfigError(f"checkpoint_step={options['checkpoint_step']}: no such checkpoint in {directory} "
                          f"(steps: {', '.join(map(str, steps))})")
    output = options.get("output")
    if output:
        if _exists(output):
            raise ConfigError(f"output={output} already exists; choose another folder (nothing is overwritten)")
        reason = None if storage.is_remote(output) else unwritable_reason(output)
        if reason is not None:
            raise ConfigError(f"output={output}: {reason}")
    elif options.get("output") is not None:
        raise ConfigError("output= is empty; give a folder that does not exist yet (or leave output out)")
    return cfg, options


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2000000` -> bytes (decimal units, as transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    value = str(text).strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit) and value[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return max(1, int(float(value[: -len(unit)]) * factor))
    if value.isdigit():
        return max(1, int(value))
    raise ConfigError(f"max_shard_size must be a size such as 5GB, 500MB or a number of bytes, got {text!r}")


def export(cfg: Config, options: dict[str, str]) -> str:
    """Restores the parameters onto this machine's devices and writes the export; returns its path."""
    # The export only needs to hold the parameters: FSDP over whatever devices are here.
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1, fsdp=-1, tensor=1, dcn_data=1,
                                                              dcn_fsdp=1))
    run = Run.from_config(cfg)
    if cfg.model.vocab_size is None:  # a config that leaves it to the tokenizer: ask the (cached) tokenizer
        run, _ = run.with_run_tokenizer()
    cfg, model_cfg = run.cfg, run.model_cfg
    directory = storage.absolute(storage.join(cfg.workdir, "checkpoints"))
    step = int(options["checkpoint_step"]) if "checkpoint_step" in options else None
    with run.context():
        restored, step = restore_items(directory, {"params": run.params_spec().restore_target()}, step)
    dtype = jnp.dtype(options.get("dtype", "float32"))
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          restored["params"])

    output = storage.absolute(options.get("output") or storage.join(cfg.workdir, "export", f"step_{step}"))
    if _exists(output):
        raise ConfigError(f"output={output} already exists; choose another folder (nothing is overwritten)")
    storage.makedirs(output)
    if options.get("format") == "hf":
        write_hf(cfg, params, output, options.get("max_shard_bytes", 5 * 10**9))
        if jax.process_index() == 0:
            print(f"exported the parameters of step {step} ({dtype}) in the Hugging Face T5 format to {output}",
                  flush=True)
        return output
    with ocp.StandardCheckpointer(temporary_path_class=temporary_path_class(output)) as checkpointer:
        checkpointer.save(orbax_directory(storage.join(output, "params")), params)
    if jax.process_index() == 0:
        model = {**dataclasses.asdict(cfg.model), "padded_vocab_size": model_cfg.padded_vocab_size,
                 "param_dtype": str(dtype), "exported_from": storage.join(directory, str(step))}
        storage.write_text(storage.join(output, "model.json"), json.dumps(model, indent=2) + "\n")
        storage.write_text(storage.join(output, "config.yaml"), dump_yaml(cfg))
        print(f"exported the parameters of step {step} ({dtype}) to {output}", flush=True)
    return output


def write_hf(cfg: Config, params: Any, output: str, max_shard_bytes: int) -> None:
    """config.json, the safetensors weights (every process gathers, process 0 writes), tokenizer files."""
    from trainer.hf_weights import hf_tensors, write_safetensors

    rows = cfg.model.padded_vocab_size
    write = jax.process_index() == 0
    with storage.staged_dir(output) as local:  # safetensors writes local files: uploaded for a URL
        write_safetensors(hf_tensors(params, cfg.model, rows), local, max_shard_bytes=max_shard_bytes, write=write)
        if write:
            _write_hf_files(cfg, rows, local)


def _write_hf_files(cfg: Config, rows: int, output: str) -> None:
    from trainer.hf_config import hf_config

    Path(output, "config.json").write_text(json.dumps(hf_config(cfg.model, rows), indent=2) + "\n")
    Path(output, "generation_config.json").write_text(json.dumps(
        {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}, indent=2) + "\n")
    if cfg.data.tokenizer == "byt5" and cfg.data.source != "synthetic":
        Path(output, "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "ByT5Tokenizer", "extra_ids": cfg.data.num_sentinels}, indent=2) + "\n")
    spm = cfg.data.tokenizer_path if cfg.data.tokenizer == "sentencepiece" else None
    if spm and storage.isfile(spm) and cfg.data.source != "synthetic":
        storage.copy_file(spm, os.path.join(output, "spiece.model"))
        Path(output, "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "T5Tokenizer", "extra_ids": cfg.data.num_sentinels, "eos_token": "</s>",
             "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")


def _exists(path: str) -> bool:
    return storage.exists(path) or (storage.is_remote(path) and storage.isdir(path))


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda args: export(*parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
