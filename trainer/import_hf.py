"""`python -m trainer.import_hf PATH --out RUN [CONFIG.yaml] [key=value ...]`: a local Hugging Face
T5-family checkpoint (T5, T5 v1.1, Flan-T5, mT5, ByT5) -> a run directory.

RUN then holds what training would have written before its first step, so every command takes it:

    RUN/config.yaml          the config (CONFIG.yaml or the default, the model options from config.json,
                             the overrides), with `data.tokenizer_path` at RUN/spiece.model when the
                             checkpoint has one; without one, ids are the text (data.source=synthetic:
                             decode reads and writes space-separated token ids)
    RUN/spiece.model         the checkpoint's SentencePiece model, copied (ByT5 checkpoints, whose
                             tokenizer_config.json names ByT5Tokenizer, get data.tokenizer=byt5)
    RUN/checkpoints/0/       the parameters (an Orbax checkpoint of parameters only, written shard by
                             shard on this machine's mesh)

`trainer.decode workdir=RUN` and `trainer.export workdir=RUN` read it like any run; `trainer.train
RUN/config.yaml` fine-tunes from it (a fresh optimizer at step 0). Nothing is downloaded: PATH is a
local directory. Exit codes: 0, or 2 with one line naming the problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax

from model import ModelConfig
from trainer import storage
from trainer.config import Config, ConfigError, dump_yaml, load_config, run_command
from trainer.hf_config import model_options, read_hf_config
from trainer.hf_weights import WeightFiles, load_params
from trainer.workdir import unwritable_reason

SPIECE = "spiece.model"
# Keys the checkpoint decides: an override of one of them is refused, not silently replaced.
_CHECKPOINT_KEYS = ("d_model", "num_heads", "head_dim", "mlp_dim", "encoder_layers", "decoder_layers", "activation",
                    "norm", "norm_position", "norm_eps", "positions", "relative_buckets", "relative_max_distance",
                    "attention_scaling", "share_embeddings", "tie_output")


def _tokenizer_config(path: Path) -> dict[str, Any]:
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def _tokenizer_class(path: Path) -> str | None:
    return _tokenizer_config(path).get("tokenizer_class")


def _num_sentinels(path: Path, default: int = 100) -> int:
    """T5 tokenizers add `extra_ids` sentinels (100, ByT5 125, unless tokenizer_config.json says otherwise)."""
    extra = _tokenizer_config(path).get("extra_ids")
    return extra if isinstance(extra, int) and not isinstance(extra, bool) and extra >= 0 else default


def _vocab_multiple(tokenizer_size: int, rows: int, source: str) -> int:
    """The padding multiple that gives our table exactly the checkpoint's `rows` (T5: 32,100 ids in 32,128 rows)."""
    if tokenizer_size > rows:
        raise ConfigError(f"{source}: mismatched vocabulary: the tokenizer has {tokenizer_size} ids but the "
                          f"checkpoint's tables have {rows} rows (config.json vocab_size)")
    for multiple in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if -(-tokenizer_size // multiple) * multiple == rows:
            return multiple
    raise ConfigError(f"{source}: mismatched vocabulary: the tokenizer's {tokenizer_size} ids do not round up to "
                      f"the checkpoint's {rows} rows (config.json vocab_size) by any vocab_multiple <= 1024")


def import_config(path: Path, out: str, args: list[str]) -> tuple[Config, int]:
    """The run's config and the number of embedding rows the checkpoint has; ConfigError when unusable."""
    hf = read_hf_config(path)
    options = model_options(hf, source=str(path / "config.json"))
    rows = options["vocab_size"]
    cfg = load_config(args)
    for key in _CHECKPOINT_KEYS:  # an override of the architecture would not load the weights
        if any(a.startswith(f"model.{key}=") for a in args) and getattr(cfg.model, key) != options[key]:
            raise ConfigError(f"model.{key}={getattr(cfg.model, key)} differs from the checkpoint's {options[key]} "
                              f"({path / 'config.json'}); leave it out")
    keep = {k: getattr(cfg.model, k) for k in ("dtype", "param_dtype", "scan_layers", "remat", "max_length")}
    if not any(a.startswith("model.dropout=") for a in args):
        keep["dropout"] = options["dropout"]
    model = ModelConfig(**{**options, **keep})
    data = cfg.data
    spiece = path / SPIECE
    if spiece.is_file():
        from trainer.data.vocab import SentencePieceTokenizer

        sentinels = _num_sentinels(path)
        try:
            tokenizer = SentencePieceTokenizer.load(str(spiece), sentinels)
        except (ValueError, OSError, RuntimeError) as e:
            raise ConfigError(f"{spiece}: {e}") from None
        model = dataclasses.replace(model, vocab_size=tokenizer.vocab_size,
                                    vocab_multiple=_vocab_multiple(tokenizer.vocab_size, rows, str(path)))
        data = dataclasses.replace(data, tokenizer="sentencepiece", tokenizer_path=storage.join(
            storage.absolute(out), SPIECE), vocab_size=tokenizer.vocab_size, num_sentinels=sentinels)
    elif _tokenizer_class(path) == "ByT5Tokenizer":  # bytes in ByT5's id layout, no model file
        from trainer.data.vocab import ByteTokenizer

        tokenizer = ByteTokenizer(_num_sentinels(path, default=125), "byt5")
        model = dataclasses.replace(model, vocab_size=tokenizer.vocab_size,
                                    vocab_multiple=_vocab_multiple(tokenizer.vocab_size, rows, str(path)))
        data = dataclasses.replace(data, tokenizer="byt5", tokenizer_path=None, num_sentinels=tokenizer.num_sentinels)
    else:  # no tokenizer: the text is token ids, as in synthetic runs
        data = dataclasses.replace(data, source="synthetic", num_sentinels=0)
    decode = cfg.decode
    if not any(a.startswith("decode.eval_samples=") for a in args):
        decode = dataclasses.replace(decode, eval_samples=0)
    cfg = dataclasses.replace(cfg, model=model, data=data, decode=decode, workdir=out)
    try:
        model.validate()
        cfg.data.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg, rows


def check_model_matches(path: Path, model: ModelConfig) -> int:
    """For `checkpoint.restore_from=hf:PATH`: the run's model is the checkpoint's; returns its table rows."""
    options = model_options(read_hf_config(path), source=str(path / "config.json"))
    differ = [f"model.{k}: run {getattr(model, k)!r}, checkpoint {options[k]!r}" for k in _CHECKPOINT_KEYS
              if getattr(model, k) != options[k]]
    if differ:
        raise ConfigError(f"checkpoint.restore_from=hf:{path}: the run's model differs from the checkpoint's: "
                          + "; ".join(differ))
    rows = options["vocab_size"]
    if model.vocab_size is None or model.vocab_size > rows:
        raise ConfigError(f"checkpoint.restore_from=hf:{path}: mismatched vocabulary: the run has {model.vocab_size} "
                          f"ids but the checkpoint's tables have {rows} rows (config.json vocab_size)")
    return rows


def load_hf_params(path: str | Path, target: Any, model: ModelConfig) -> Any:
    """The checkpoint's parameters on `target`'s shardings (ShapeDtypeStructs), read shard by shard."""
    path = Path(storage.local_tree(os.fspath(path)))  # a bucket's checkpoint: read from a local copy
    check_model_matches(path, model)
    return load_params(WeightFiles(path), target, model)


def parse_args(argv: list[str]) -> tuple[Path, str, list[str]]:
    path, out, rest = None, None, []
    it = iter(argv)
    for arg in it:
        if arg == "--out":
            out = next(it, None)
        elif arg.startswith("--out="):
            out = arg.partition("=")[2]
        elif path is None and "=" not in arg and not arg.endswith((".yaml", ".yml")):
            path = arg
        else:
            rest.append(arg)
    if path is None:
        raise ConfigError("missing PATH: a local Hugging Face checkpoint directory (config.json + weights)")
    if not out:
        raise ConfigError("missing `--out RUN`: the run directory to create")
    storage.check(path)
    storage.check(out)
    if not storage.isdir(path):
        raise ConfigError(f"{path}: not a directory (a Hugging Face checkpoint folder, local or in a bucket; "
                          f"nothing is downloaded from the Hub)")
    if any(a.startswith("workdir=") for a in rest):
        raise ConfigError("workdir= is set by --out RUN; leave it out")
    if storage.isfile(out) or storage.listdir(out):
        raise ConfigError(f"--out {out} already exists and is not empty; choose another folder (nothing is "
                          "overwritten)")
    reason = None if storage.is_remote(out) else unwritable_reason(out)
    if reason is not None:
        raise ConfigError(f"--out {out}: {reason}")
    return Path(storage.local_tree(path)), out, rest


def import_checkpoint(path: Path, out: str, args: list[str]) -> Config:
    from trainer.checkpoint import save_params_checkpoint
    from trainer.run import Run

    cfg, rows = import_config(path, out, args)
    files = WeightFiles(path)  # unreadable weights fail before anything is written
    run = Run.from_config(cfg)
    with run.context():
        spec = run.params_spec()
        params = load_params(files, spec.restore_target(), run.model_cfg)
        storage.makedirs(out)
        if jax.process_index() == 0 and (path / SPIECE).is_file():
            storage.copy_file(str(path / SPIECE), storage.join(out, SPIECE))
        save_params_checkpoint(storage.join(out, "checkpoints"), 0, params, cfg)
    if jax.process_index() == 0:
        storage.write_text(storage.join(out, "config.yaml"), dump_yaml(cfg))
        print(f"imported {path} ({cfg.model.encoder_layers}+{cfg.model.decoder_layers} layers, d_model "
              f"{cfg.model.d_model}, {rows} vocabulary rows) to {storage.absolute(out)}", flush=True)
    return cfg


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda args: import_checkpoint(*parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
