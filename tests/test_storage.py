"""trainer.storage against real local servers (tests/object_store.py): the one path layer."""

import os

import pytest

from tests.object_store import _server_logs, object_store  # noqa: F401  (fixtures)
from trainer import storage


def test_files_round_trip(object_store):
    root = object_store.url("run")
    storage.write_text(storage.join(root, "a.txt"), "one")
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a.txt")) == "one"
    assert storage.exists(storage.join(root, "a.txt")) and storage.isfile(storage.join(root, "a.txt"))
    assert storage.isdir(root) and storage.isdir(storage.join(root, "sub"))
    assert not storage.isdir(storage.join(root, "nothing")) and not storage.exists(storage.join(root, "nothing"))
    assert storage.listdir(root) == ["a.txt", "sub"]
    assert storage.walk_files(root) == ["a.txt", "sub/b.bin"]
    assert storage.glob(storage.join(root, "*.txt")) == [storage.join(root, "a.txt")]
    assert storage.size(storage.join(root, "sub", "b.bin")) == 2
    storage.write_text(storage.join(root, "a.txt"), "two")  # overwrite
    assert storage.read_text(storage.join(root, "a.txt")) == "two"
    storage.move(storage.join(root, "sub"), storage.join(root, "moved"))
    assert storage.listdir(root) == ["a.txt", "moved"]
    local = storage.local_copy(storage.join(root, "moved", "b.bin"))
    assert not storage.is_remote(local) and open(local, "rb").read() == b"\x00\x01"
    storage.rmtree(root)
    assert storage.listdir(root) == []


def test_missing_client_is_a_one_line_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_s3fs(name, *a, **k):
        if name == "s3fs":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_s3fs)
    with pytest.raises(storage.StorageError, match=r"s3://b/x: s3:// paths need the `s3fs` package: pip install -e '\.\[s3\]'"):
        storage.check("s3://b/x")
    with pytest.raises(storage.StorageError, match="unsupported storage scheme 'hdfs'"):
        storage.check("hdfs://b/x")


def test_local_paths_unchanged(tmp_path):
    p = os.path.join(tmp_path, "d", "f.txt")
    storage.write_text(p, "x")
    assert open(p).read() == "x" and storage.listdir(os.path.dirname(p)) == ["f.txt"]
    assert storage.local_copy(p) == p and storage.absolute("rel") == os.path.abspath("rel")
    assert storage.absolute("gs://b/run/") == "gs://b/run" and storage.dirname("gs://b/run/x") == "gs://b/run"


def test_config_file_in_a_bucket(object_store):
    """A config file at a URL, extending another by a relative `base:`."""
    from trainer.config import load_config

    storage.write_text(object_store.url("cfg", "base.yaml"), "base: tiny.yaml\nseed: 7\n")
    storage.copy_file(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
                      object_store.url("cfg", "tiny.yaml"))
    storage.write_text(object_store.url("cfg", "run.yaml"), "base: base.yaml\ntrain: {steps: 3}\n")
    cfg = load_config([object_store.url("cfg", "run.yaml"), "workdir=w"])
    assert (cfg.seed, cfg.train.steps, cfg.model.d_model) == (7, 3, 32)
