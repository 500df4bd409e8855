"""A Cloud Storage emulator on 127.0.0.1 for the tests: `python tests/support/gcs_emulator.py PORT BUCKET`.

gcp-storage-emulator (pip, test extra), with one gap filled: real GCS answers every object
download with `x-goog-generation` / `x-goog-metageneration` headers, which tensorstore (orbax's
array writer) reads to version the OCDBT manifest; the emulator leaves them out, and tensorstore
then fails with "Malformed StorageGeneration". The headers are added from the emulator's own
object record. And in memory (how the tests run it) the emulator still serialises its whole
object table to a `.meta` JSON after every write, so a bucket of N objects costs O(N) per write
(2,000 writes: 34 s here, quadratic); that file only serves a restart from disk, so in memory
the write is skipped. Everything else is the emulator as published.
"""
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator import storage as emulator_storage
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the emulator already answered 404
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


_write_config = emulator_storage.Storage._write_config_to_file


def _write_config_unless_in_memory(self):
  if not self._store._use_memory:
    _write_config(self)


emulator_storage.Storage._write_config_to_file = _write_config_unless_in_memory
objects.download = _download_with_generation  # objects.get(alt=media) calls it by this name
server.HANDLERS = tuple(
    (pattern, {m: (_download_with_generation if h is _download else h) for m, h in by.items()})
    for pattern, by in server.HANDLERS)


if __name__ == "__main__":
  port, bucket = int(sys.argv[1]), sys.argv[2]
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
