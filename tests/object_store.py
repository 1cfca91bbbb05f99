"""Real object-storage servers on 127.0.0.1 for the tests: gcp-storage-emulator (the GCS JSON API,
with the generations and preconditions it lacks added: tests/gcs_emulator.py) and moto's S3 server. No mocks: the project's code talks HTTP to them through the same clients
(gcsfs, s3fs, TensorStore) it uses against the clouds, steered by the standard endpoint variables.

`object_store` is a fixture parametrised over both: it yields a `Store` with a fresh bucket URL
for the test and the environment (endpoint, credentials) that subprocesses need. One server of
each kind is started per pytest worker process and stopped at its end.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

_counter = itertools.count()


@dataclasses.dataclass
class Store:
    scheme: str  # "gs" or "s3"
    env: dict[str, str]  # what a subprocess needs to reach the server
    bucket: str

    def url(self, *parts: str) -> str:
        return "/".join([f"{self.scheme}://{self.bucket}", *parts])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], port: int, log: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}: {open(log).read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not listen on port {port} within 60 s")


class _Server:
    def __init__(self, scheme: str, tmp_dir: str):
        self.scheme = scheme
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = os.path.join(tmp_dir, f"{scheme}-server-{port}.log")
        if scheme == "gs":
            self.proc = _start([sys.executable, "-m", "tests.gcs_emulator", str(port)], port, log)
            self.env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                        "GOOGLE_CLOUD_PROJECT": "test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        else:
            self.proc = _start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, log)
            self.env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}

    def make_bucket(self) -> str:
        name = f"b{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"
        if self.scheme == "gs":
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket(name)
        else:
            import boto3

            boto3.client("s3").create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_servers: dict[str, _Server] = {}


def server(scheme: str, tmp_dir: str) -> _Server:
    if scheme not in _servers:
        _servers[scheme] = _Server(scheme, tmp_dir)
        os.environ.update(_servers[scheme].env)  # this process's clients (and its subprocesses) use it
    return _servers[scheme]


@pytest.fixture(scope="session")
def _server_logs(tmp_path_factory):
    yield str(tmp_path_factory.mktemp("object-store"))
    for s in _servers.values():
        s.stop()
    _servers.clear()


@pytest.fixture(params=["gs", "s3"])
def object_store(request, _server_logs) -> Store:
    """A fresh bucket on a local GCS emulator, then on a local S3 server."""
    srv = server(request.param, _server_logs)
    return Store(request.param, dict(srv.env), srv.make_bucket())
