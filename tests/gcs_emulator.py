"""gcp-storage-emulator with the two parts of the GCS JSON API it lacks and our clients rely on.

`python -m tests.gcs_emulator PORT` serves the emulator from the package registry (in memory) with:
- object generations on media downloads (`x-goog-generation` / `x-goog-metageneration` headers):
  TensorStore, which writes Orbax's array data, reads an object's generation from them and
  rejects a download without one ("Malformed StorageGeneration");
- preconditions: `ifGenerationMatch` on uploads and deletes (0 = the object must not exist), answered
  412 like GCS; without them a conditional create (the workdir lock, OCDBT's manifest) cannot fail.
Everything else is the emulator's own code, reached over HTTP by the real clients.
"""

from __future__ import annotations

import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_lock = threading.Lock()  # a precondition check and its write happen as one step


def _current_generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _object_name(request) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else data
        return meta.get("name")
    return None


def _precondition_failed(response) -> None:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
                              "errors": [{"reason": "conditionNotMet"}]}})


def _conditional(handler, name_of):
    def wrapped(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if not wanted:
            return handler(request, response, storage, *args, **kwargs)
        with _lock:
            name = name_of(request)
            if name is not None and _current_generation(storage, request.params["bucket_name"], name) != wanted[0]:
                return _precondition_failed(response)
            return handler(request, response, storage, *args, **kwargs)
    return wrapped


def _with_generation(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        result = handler(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            try:
                obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            except NotFound:
                return result
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return result
    return wrapped


objects.download = _with_generation(objects.download)
objects.insert = _conditional(objects.insert, _object_name)
objects.delete = _conditional(objects.delete, lambda request: request.params["object_id"])

if __name__ == "__main__":
    from gcp_storage_emulator.server import create_server  # imported after the handlers are wrapped

    server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True)
    server.start()
    threading.Event().wait()
