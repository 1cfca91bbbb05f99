"""One path layer: every file the project reads or writes on a user's path goes through here.

A path is a local path or a URL: `gs://bucket/key` (Google Cloud Storage, through `gcsfs`:
`pip install -e .[gcs]`) or `s3://bucket/key` (S3 and S3-compatible stores, through `s3fs`:
`pip install -e .[s3]`). Remote access is fsspec's, the same filesystems `etils.epath` (and so
Orbax) uses; local paths keep plain `os` calls, so nothing changes for them.

What object storage lacks, and how callers cope:
- no rename: `write_bytes` is atomic anyway (one object is created whole, or not at all);
  `move` copies then deletes;
- no append: `metrics.jsonl` is rewritten whole (see `trainer.metrics`);
- no file locks: `trainer.workdir` uses a conditional create of a lock object instead;
- libraries that need a local file (SentencePiece training, ArrayRecord readers, safetensors'
  mmap) get one from `local_copy` (a cache keyed by the object's URL, size and generation).

Endpoints: `STORAGE_EMULATOR_HOST` (GCS; also handed to TensorStore as
`TENSORSTORE_GCS_HTTP_URL`) and `AWS_ENDPOINT_URL` (S3) point everything at another server, such
as the local emulators the tests start.
"""

from __future__ import annotations

import contextlib
import functools
import glob as globlib
import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
from typing import IO, Any, Iterator

from trainer.config import ConfigError

# scheme -> (fsspec protocol, the module it needs, the extra that installs it)
SCHEMES = {"gs": ("gcs", "gcsfs", "gcs"), "s3": ("s3", "s3fs", "s3")}


class StorageError(ConfigError):
    """A remote path that cannot be used here (missing client package, unknown scheme)."""


def scheme(path: str | os.PathLike) -> str | None:
    """'gs' / 's3' for a URL, None for a local path."""
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    return head if sep and head.isalnum() else None


def is_remote(path: str | os.PathLike) -> bool:
    return scheme(path) is not None


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute; a URL with a single trailing slash removed."""
    text = os.fspath(path)
    if is_remote(text):
        return text.rstrip("/") if not text.endswith("://") else text
    return os.path.abspath(os.path.expanduser(text))


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
    if is_remote(path):
        head, _, rest = path.rstrip("/").partition("://")
        return f"{head}://{posixpath.dirname(rest)}" if "/" in rest else path
    return os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


# ------------------------------------------------------------------------------ filesystems


def configure_endpoints() -> None:
    """Honours STORAGE_EMULATOR_HOST for TensorStore too (Orbax writes array data through it)."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        url = emulator if "://" in emulator else f"http://{emulator}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        # gcsfs would otherwise ask the storage-control API (absent from emulators) each bucket's layout
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _require(path: str) -> str:
    s = scheme(path)
    if s not in SCHEMES:
        raise StorageError(f"{path}: unsupported storage scheme {s!r}:// (local paths, gs:// and s3:// are)")
    protocol, module, extra = SCHEMES[s]
    try:
        __import__(module)
    except ImportError:
        raise StorageError(f"{path}: {s}:// paths need the `{module}` package: pip install -e '.[{extra}]'") from None
    return protocol


@functools.cache
def _fs(protocol: str) -> Any:
    import fsspec

    configure_endpoints()
    logging.getLogger("gcsfs").setLevel(logging.ERROR)  # per-call retry chatter; errors still raise
    # Listing caches would hide objects other processes (and TensorStore) wrote meanwhile.
    return fsspec.filesystem(protocol, use_listings_cache=False, skip_instance_cache=True)


def filesystem(path: str) -> Any:
    """The fsspec filesystem for a remote path (a StorageError when its client is missing)."""
    return _fs(_require(path))


def _key(path: str) -> str:
    """A URL without its scheme: what fsspec's object-store filesystems take."""
    return path.partition("://")[2]


def check(path: str | os.PathLike) -> None:
    """A StorageError now (before any long compile) when `path` is a URL this install cannot use."""
    if is_remote(path):
        _require(os.fspath(path))


# -------------------------------------------------------------------------------- queries


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs = filesystem(path)
    return fs.exists(_key(path))


def isdir(path: str) -> bool:
    """On object storage, a 'folder' is any prefix with objects under it."""
    if not is_remote(path):
        return os.path.isdir(path)
    fs = filesystem(path)
    key = _key(path).rstrip("/")
    if "/" not in key:  # a bucket
        return fs.exists(key)
    return bool(listdir(path))  # one listing, not an isdir request and then a listing


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    return filesystem(path).isfile(_key(path))


def listdir(path: str) -> list[str]:
    """Names directly under `path` (sorted); [] when there is nothing."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs = filesystem(path)
    key = _key(path).rstrip("/")
    try:
        entries = fs.ls(key + "/", detail=False)
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != key})


def glob(pattern: str) -> list[str]:
    if not is_remote(pattern):
        return sorted(globlib.glob(pattern))
    s = scheme(pattern)
    return sorted(f"{s}://{k}" for k in filesystem(pattern).glob(_key(pattern)))


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    return int(filesystem(path).info(_key(path))["size"])


def version(path: str) -> str:
    """Something that changes whenever the file does (mtime and size; generation or ETag remotely)."""
    if not is_remote(path):
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    info = filesystem(path).info(_key(path))
    tag = info.get("generation") or info.get("ETag") or info.get("etag") or info.get("mtime") or ""
    return f"{info.get('size')}:{tag}"


# ------------------------------------------------------------------------------- contents


def open_file(path: str, mode: str = "r", **kwargs: Any) -> IO:
    """A file object; for writes to object storage the object appears whole when it is closed."""
    if not is_remote(path):
        return open(path, mode, **kwargs)
    binary = "b" in mode
    f = filesystem(path).open(_key(path), mode if binary else mode + "b")
    if binary:
        return f
    import io

    return io.TextIOWrapper(f, encoding=kwargs.get("encoding", "utf-8"), newline=kwargs.get("newline"))


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    return filesystem(path).cat_file(_key(path))


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Atomic: readers see the old contents or the new, never a part (temporary file + rename
    locally; an object upload is all-or-nothing)."""
    if is_remote(path):
        filesystem(path).pipe_file(_key(path), data)
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def makedirs(path: str) -> None:
    """Local folders; nothing to do on object storage (prefixes exist once objects do)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
    else:
        check(path)


def remove(path: str) -> None:
    """Removes a file (missing is fine)."""
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with contextlib.suppress(FileNotFoundError):
        filesystem(path).rm_file(_key(path))


def rmtree(path: str) -> None:
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        filesystem(path).rm(_key(path).rstrip("/"), recursive=True)


def move(src: str, dst: str) -> None:
    """Renames a file or folder (on object storage: copies every object, then deletes them)."""
    if not is_remote(src) and not is_remote(dst):
        os.rename(src, dst)
        return
    if is_remote(src) != is_remote(dst) or scheme(src) != scheme(dst):
        copy_tree(src, dst)
        rmtree(src)
        return
    fs = filesystem(src)
    if fs.isfile(_key(src)):
        fs.copy(_key(src), _key(dst))
        fs.rm_file(_key(src))
        return
    files = walk_files(src)  # object by object: fsspec's recursive mv trips over folder markers on S3
    for rel in files:
        fs.copy(_key(join(src, rel)), _key(join(dst, rel)))
    for rel in files:
        fs.rm_file(_key(join(src, rel)))


def copy_file(src: str, dst: str) -> None:
    if not is_remote(src) and not is_remote(dst):
        shutil.copyfile(src, dst)
    elif is_remote(dst) and not is_remote(src):
        filesystem(dst).put_file(src, _key(dst))
    elif is_remote(src) and not is_remote(dst):
        filesystem(src).get_file(_key(src), dst)
    else:
        write_bytes(dst, read_bytes(src))


def copy_tree(src: str, dst: str) -> None:
    """Every file under `src` to the same relative path under `dst` (either side local or remote)."""
    for rel in walk_files(src):
        target = join(dst, *rel.split("/"))
        if not is_remote(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        copy_file(join(src, *rel.split("/")), target)


def walk_files(root: str) -> list[str]:
    """Paths ('/'-separated, relative to `root`) of every file under `root`, sorted."""
    if not is_remote(root):
        out = []
        for d, _, files in os.walk(root):
            for name in files:
                out.append(os.path.relpath(os.path.join(d, name), root).replace(os.sep, "/"))
        return sorted(out)
    fs = filesystem(root)
    key = _key(root).rstrip("/")
    return sorted(posixpath.relpath(k, key) for k in fs.find(key))


# ------------------------------------------------------------------------------ local copies


def cache_root() -> str:
    return os.environ.get("SEQ2SEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "seq2seq-trainer")


def local_copy(path: str) -> str:
    """A local file with `path`'s contents: `path` itself when it is local, else a cached download
    (refreshed when the object changes), for libraries that only open local files."""
    if not is_remote(path):
        return path
    tag = hashlib.sha256(f"{path}\n{version(path)}".encode()).hexdigest()[:24]
    target = os.path.join(cache_root(), "remote", tag, basename(path))
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
        os.close(fd)
        try:
            filesystem(path).get_file(_key(path), tmp)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return target


@contextlib.contextmanager
def staged_dir(final: str) -> Iterator[str]:
    """A local folder to write into; on success its files are uploaded to `final` when that is a
    URL (for writers that need a local directory: safetensors, ArrayRecord). Local `final` is used
    directly."""
    if not is_remote(final):
        os.makedirs(final, exist_ok=True)
        yield final
        return
    check(final)
    with tempfile.TemporaryDirectory(prefix="seq2seq-stage-") as tmp:
        yield tmp
        copy_tree(tmp, final)


# --------------------------------------------------------------------------- Orbax on S3


@functools.cache
def orbax_s3() -> None:
    """Lets Orbax write array data to s3:// through TensorStore's S3 driver.

    Orbax 0.12 builds TensorStore specs for gs:// and local paths only (an s3:// path is rejected
    as "not absolute"); its metadata already goes through epath, which handles s3://. This routes
    s3:// directories to TensorStore's `s3` kvstore, with `AWS_ENDPOINT_URL` as its endpoint.
    """
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

    for module, name in ((tsu, "_use_gcs_driver"), (tsu, "_normalize_path"), (gcs_utils, "get_kvstore_for_gcs")):
        if not hasattr(module, name):  # a newer Orbax: refuse clearly rather than write elsewhere
            raise StorageError(f"s3:// checkpoints: this orbax-checkpoint lacks {module.__name__}.{name}; "
                               f"use orbax-checkpoint 0.12.x")
    use_gcs, normalize, gcs_kvstore = tsu._use_gcs_driver, tsu._normalize_path, gcs_utils.get_kvstore_for_gcs

    def use_remote_driver(directory: str) -> bool:
        return directory.startswith("s3://") or use_gcs(directory)

    def normalize_path(path: str) -> str:
        if path.startswith("s3://"):
            return "s3://" + posixpath.normpath(path[5:])
        return normalize(path)

    def kvstore(path: str) -> dict[str, Any]:
        if not path.startswith("s3://"):
            return gcs_kvstore(path)
        bucket, _, key = path[5:].partition("/")
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            spec["aws_region"] = region
        return spec

    tsu._use_gcs_driver, tsu._normalize_path, gcs_utils.get_kvstore_for_gcs = use_remote_driver, normalize_path, kvstore


def local_tree(path: str) -> str:
    """A local folder with the files under `path` (itself when local; else cached downloads, one
    `local_copy` per file), for readers of whole folders such as a Hugging Face checkpoint."""
    if not is_remote(path):
        return path
    files = walk_files(path)
    listing = "\n".join(f"{rel}:{version(join(path, rel))}" for rel in files)
    root = os.path.join(cache_root(), "remote", hashlib.sha256(f"{path}\n{listing}".encode()).hexdigest()[:24])
    for rel in files:
        target = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(local_copy(join(path, rel)), target)
    return root
