"""The one-run-per-workdir lock on object storage (gs://, s3://), where there are no file locks.

`trainer.workdir.WorkdirLock` uses it for a bucket workdir; the protocol is in `ObjectLock`'s
docstring. Clients: google-cloud-storage (GCS) and botocore (S3), from the `gcs` / `s3` extras; both
honour the emulator endpoints (STORAGE_EMULATOR_HOST, AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from typing import Any

from trainer import storage
from trainer.workdir import WorkdirBusy, busy_message, holder_info

LEASE_S = 60.0  # how long a lock outlives its last renewal (renewed every third of it)


class ObjectLock:
    """The workdir lock on object storage: the object `WORKDIR/.lock`, held under a lease.

    Protocol (every write is conditional, so of two runs racing for the lock exactly one wins):
    - acquire: create the object only if it does not exist (GCS `ifGenerationMatch=0`, S3
      `If-None-Match: *`). Its JSON body names the holder (as the local lock file does), a random
      `token`, and the lease: `expires` (unix time) and `lease_s`.
    - while the run lives, a daemon thread renews the lease every `lease_s / 3`: it rewrites the
      body with a later `expires`, conditional on the object still being the version (GCS
      generation, S3 ETag) that this lock wrote and has just read back. A renewal that finds the lock taken by
      someone else prints one warning and stops renewing; the run itself goes on.
    - a run that dies without releasing leaves its object behind; once its `expires` has passed
      the lock is stale, and a new run takes it over with a write conditional on the version it
      observed (two runs stealing it at once: one wins, the other sees the winner's live lease).
    - release: stop renewing, then delete the object only while it is still this lock's version.
    Each step reads the object first (holder, expiry, whether it is still ours) and then writes
    conditionally on what it read; the condition, checked by the server, is what makes it safe.

    Caveat, clock skew: `expires` is written with the holder's clock and judged with the reader's.
    Clocks that disagree by more than about `lease_s * 2/3` (the slack between renewals) let a
    live lock look stale; NTP-synchronised machines are off by milliseconds, far below LEASE_S.
    A run killed outright (SIGKILL, preemption) blocks its workdir until its lease expires.
    """

    def __init__(self, workdir: str, url: str, lease_s: float):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.workdir, self.url, self.lease_s = workdir, url, float(lease_s)
        self._store: _Gcs | _S3 | None = None
        self._token = uuid.uuid4().hex  # tells this lock's writes from anyone else's
        self._info: dict[str, Any] = {}
        self._version: Any = None  # the generation / ETag this lock last wrote; None when not held
        self._mutex = threading.Lock()  # renewal vs release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._version is not None

    @property
    def store(self) -> "_Gcs | _S3":
        if self._store is None:
            self._store = object_client(self.url)
        return self._store

    def _body(self) -> bytes:
        now = time.time()
        info = {**self._info, "token": self._token, "lease_s": self.lease_s, "expires": round(now + self.lease_s, 3)}
        return (json.dumps(info) + "\n").encode()

    def _mine(self, data: bytes) -> bool:
        return _parse(data).get("token") == self._token

    def acquire(self) -> None:
        if self._version is not None:
            return
        self._info = holder_info()
        for _ in range(20):
            found = self.store.read()
            try:
                if found is None:
                    version = self.store.write(self._body(), None)
                elif self._mine(found[0]):  # our own create, retried by the client after it had landed
                    version = found[1]
                else:
                    data, seen = found
                    holder = _parse(data)
                    expires = holder.get("expires")
                    if not isinstance(expires, (int, float)) or expires > time.time():
                        raise WorkdirBusy(busy_message(self.workdir, self.url, data.decode("utf-8", "replace")))
                    version = self.store.write(self._body(), seen)
                    print(f"workdir lock {self.url}: took over a stale lock from {_who(holder)}: its lease "
                          f"expired {time.time() - expires:.0f} s ago, so that run ended without releasing it",
                          file=sys.stderr, flush=True)
            except _Conflict:
                continue  # the object changed since we read it: look again
            self._version = version
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name="workdir-lock-lease", daemon=True)
            self._thread.start()
            return
        raise OSError(f"could not lock {self.url}: the lock object keeps changing")

    def _renew_loop(self) -> None:
        failing = False
        while not self._stop.wait(self.lease_s / 3):
            with self._mutex:
                if self._version is None or self._stop.is_set():
                    return
                try:
                    found = self.store.read()
                    if found is not None and self._mine(found[0]):
                        try:
                            self._version = self.store.write(self._body(), found[1])
                        except _Conflict:  # changed since the read: ours still only if the client's retry landed
                            found = self.store.read()
                            if found is None or not self._mine(found[0]):
                                raise
                            self._version = found[1]
                        failing = False
                        continue
                    taken = "the lock object is gone" if found is None else f"it is held by {_who(_parse(found[0]))}"
                except _Conflict:
                    taken = "it was overwritten meanwhile"
                except Exception as e:  # noqa: BLE001 - a network blip: retried at the next renewal
                    if not failing:
                        print(f"warning: workdir lock {self.url}: could not renew the lease ({type(e).__name__}: "
                              f"{_first_line(e)}); retrying", file=sys.stderr, flush=True)
                    failing = True
                    continue
                print(f"warning: workdir lock {self.url}: lost the lock ({taken}); another run may be writing "
                      f"to {self.workdir}", file=sys.stderr, flush=True)
                return

    def stop_renewing(self) -> None:
        """Stops the lease thread without releasing (release() does this first)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def release(self) -> None:
        self.stop_renewing()
        with self._mutex:
            version, self._version = self._version, None
        if version is None:
            return
        try:
            found = self.store.read()
            if found is not None and self._mine(found[0]):
                self.store.delete(found[1])
        except _Conflict:
            pass  # taken over meanwhile: that lock is not ours to delete
        except Exception as e:  # noqa: BLE001 - the run is over either way; the lease runs out by itself
            print(f"warning: workdir lock {self.url}: could not delete the lock object ({type(e).__name__}); "
                  f"it frees itself when its lease ends, in {self.lease_s:.0f} s", file=sys.stderr, flush=True)


class _Conflict(Exception):
    """A conditional write or delete refused: the object is not the version the condition named."""


def _parse(data: bytes) -> dict[str, Any]:
    try:
        info = json.loads(data)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _who(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"


def _bucket_key(url: str) -> tuple[str, str]:
    bucket, _, key = url.partition("://")[2].partition("/")
    return bucket, key


class _Gcs:
    """google-cloud-storage: versions are object generations."""

    def __init__(self, url: str):
        try:
            from google.api_core import exceptions
            from google.cloud import storage as gcs
        except ImportError:
            raise storage.StorageError(f"{url}: a gs:// workdir needs the `google-cloud-storage` package: "
                                       f"pip install -e '.[gcs]'") from None
        self._errors = exceptions
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            client = gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "test",
                                credentials=AnonymousCredentials())
        else:
            from google.auth.exceptions import DefaultCredentialsError

            try:
                client = gcs.Client()
            except DefaultCredentialsError as e:
                raise storage.StorageError(f"{url}: no Google Cloud credentials: {_first_line(e)}") from None
        name, self.key = _bucket_key(url)
        self.bucket = client.bucket(name)

    def bucket_missing(self) -> bool:
        try:
            return not self.bucket.exists()
        except self._errors.GoogleAPICallError:
            return False  # e.g. no permission to look at the bucket itself: the lock will tell

    def read(self) -> tuple[bytes, int] | None:
        for _ in range(10):
            blob = self.bucket.get_blob(self.key)
            if blob is None:
                return None
            try:
                return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
            except (self._errors.NotFound, self._errors.PreconditionFailed):
                continue  # replaced or deleted between the two requests
        raise OSError(f"could not read gs://{self.bucket.name}/{self.key}: it keeps changing")

    def write(self, body: bytes, match: int | None) -> int:
        blob = self.bucket.blob(self.key)
        try:
            blob.upload_from_string(body, content_type="application/json",
                                    if_generation_match=0 if match is None else match)
        except self._errors.PreconditionFailed:
            raise _Conflict() from None
        return blob.generation

    def delete(self, match: int) -> None:
        try:
            self.bucket.blob(self.key).delete(if_generation_match=match)
        except self._errors.NotFound:
            pass
        except self._errors.PreconditionFailed:
            raise _Conflict() from None


class _S3:
    """botocore, which s3fs already brings (honours AWS_ENDPOINT_URL): versions are ETags."""

    def __init__(self, url: str):
        try:
            import botocore.exceptions
            import botocore.session
        except ImportError:
            raise storage.StorageError(f"{url}: an s3:// workdir needs the `botocore` package: "
                                       f"pip install -e '.[s3]'") from None
        self._errors = botocore.exceptions
        self.client = botocore.session.get_session().create_client("s3")
        self.bucket, self.key = _bucket_key(url)

    def _code(self, e: Exception) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except self._errors.NoCredentialsError as e:
            raise storage.StorageError(f"s3://{self.bucket}: no AWS credentials: {_first_line(e)}") from None

    def bucket_missing(self) -> bool:
        try:
            self._call(self.client.head_bucket)
        except self._errors.ClientError as e:
            return self._code(e) in ("404", "NoSuchBucket")
        return False

    def read(self) -> tuple[bytes, str] | None:
        try:
            r = self._call(self.client.get_object, Key=self.key)
        except self._errors.ClientError as e:
            if self._code(e) in ("NoSuchKey", "404"):
                return None
            raise
        return r["Body"].read(), r["ETag"]

    def write(self, body: bytes, match: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if match is None else {"IfMatch": match}
        try:
            r = self._call(self.client.put_object, Key=self.key, Body=body, ContentType="application/json", **condition)
        except self._errors.ClientError as e:
            # 409 ConditionalRequestConflict: a concurrent conditional write to the same key
            if self._code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise _Conflict() from None
            raise
        return r["ETag"]

    def delete(self, match: str) -> None:
        # The caller read the object and found it ours (ETag `match`); the delete is conditional
        # on that ETag too where the server supports conditional deletes (S3 since 2024).
        try:
            self._call(self.client.delete_object, Key=self.key, IfMatch=match)
        except self._errors.ClientError as e:
            code = self._code(e)
            if code in ("NoSuchKey", "404"):
                return
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise _Conflict() from None
            if code in ("NotImplemented", "501"):  # a store without conditional deletes: checked above
                self._call(self.client.delete_object, Key=self.key)
                return
            raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def object_client(url: str) -> "_Gcs | _S3":
    """The lock's client for a gs:// or s3:// URL (a StorageError when its package is missing)."""
    storage.check(url)
    return _Gcs(url) if storage.scheme(url) == "gs" else _S3(url)


def bucket_missing(url: str) -> str | None:
    """Why a bucket workdir cannot be used (its bucket does not exist), or None; creates nothing."""
    if object_client(url).bucket_missing():
        return f"bucket {_bucket_key(url)[0]} does not exist"
    return None
