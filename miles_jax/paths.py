"""Every path the CLIs take — a local folder or a URI such as gs://bucket/run — through one layer.

`etils.epath` is that layer (orbax uses it too, and tensorstore for the array bytes). Two
settings make all of them agree on how gs:// is reached, set by `configure()` (which the CLIs'
`cli.setup_process()` and the first `resolve()` of a URI call; nothing is set on import):

- `EPATH_USE_TF=false`: with TensorFlow importable, etils would send gs:// through
  `tf.io.gfile`, whose GCS filesystem neither honours `STORAGE_EMULATOR_HOST` nor shares the
  Python clients' credential chain; fsspec's gcsfs does both (ADC, the TPU VM's service account).
- `STORAGE_EMULATOR_HOST` (the variable Google's storage clients and gcsfs honour) is passed on
  to tensorstore as `TENSORSTORE_GCS_HTTP_URL`, so orbax's array writes reach the same server,
  and both clients are told the emulator needs no credentials.

gcsfs's listing cache is off: several hosts write the same workdir, and a cached listing would
hide another host's files. Only process 0 writes the small files (`write_text` callers check).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from etils import epath

Path = epath.Path


def configure() -> None:
  """The URI settings above (idempotent; explicit environment settings win)."""
  os.environ.setdefault("EPATH_USE_TF", "false")
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if emulator:
    if "://" not in emulator:
      emulator = "http://" + emulator
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
    # An emulator takes no credentials: without a token tensorstore would first wait for the
    # GCE metadata server (seconds per client) before giving up.
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    # gcsfs would ask the Storage Control API (which no emulator serves) for the bucket type
    # before every operation; an emulated bucket is a plain one.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  try:
    import fsspec.config
    gs = fsspec.config.conf.setdefault("gs", {})
    gs.setdefault("use_listings_cache", False)
  except ImportError:  # local paths only
    pass


def is_uri(path) -> bool:
  return "://" in os.fspath(path)


def resolve(path) -> str:
  """A path as a string: URIs unchanged, local paths made absolute (orbax wants absolute)."""
  path = os.fspath(path)
  if is_uri(path):
    configure()
    return path
  return os.path.abspath(path)


def join(*parts) -> str:
  return os.fspath(epath.Path(os.fspath(parts[0])).joinpath(*map(os.fspath, parts[1:])))


def dirname(path) -> str:
  return os.fspath(epath.Path(os.fspath(path)).parent)


def exists(path) -> bool:
  return epath.Path(os.fspath(path)).exists()


def isdir(path) -> bool:
  return epath.Path(os.fspath(path)).is_dir()


def makedirs(path) -> None:
  epath.Path(os.fspath(path)).mkdir(parents=True, exist_ok=True)


def rmtree(path) -> None:
  p = epath.Path(os.fspath(path))
  if p.exists():
    p.rmtree()


def read_text(path) -> str:
  return epath.Path(os.fspath(path)).read_text()


def read_bytes(path) -> bytes:
  return epath.Path(os.fspath(path)).read_bytes()


def write_text(path, text: str) -> None:
  """Writes a small file whole (one object on GCS; tmp + rename locally, so never half-written)."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path, data: bytes) -> None:
  p = epath.Path(os.fspath(path))
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_uri(path):
    p.write_bytes(data)
    return
  tmp = p.parent / f".{p.name}.tmp"
  tmp.write_bytes(data)
  os.replace(tmp, p)


def copy_tree(src, dst) -> None:
  """Copies a local folder to `dst` (a URI or a local path), file by file."""
  src = os.fspath(src)
  for root, _, files in os.walk(src):
    rel = os.path.relpath(root, src)
    for name in files:
      target = epath.Path(os.fspath(dst)) if rel == "." else epath.Path(os.fspath(dst)) / rel
      target.mkdir(parents=True, exist_ok=True)
      (target / name).write_bytes(open(os.path.join(root, name), "rb").read())


@contextlib.contextmanager
def local_file(path):
  """A local filename for `path` (a remote file is copied to a temporary folder first), for
  readers that need one (torch.load, safetensors, PyAV)."""
  path = os.fspath(path)
  if not is_uri(path):
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="miles_jax_")
  try:
    local = os.path.join(tmp, os.path.basename(path.rstrip("/")))
    with open(local, "wb") as f:
      f.write(read_bytes(path))
    yield local
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_dir(path):
  """A local folder to write `path`'s files into: `path` itself when local, else a temporary
  folder copied to the URI when the block ends without an error (writers that need real files:
  matplotlib, np.savez)."""
  path = os.fspath(path)
  if not is_uri(path):
    os.makedirs(path, exist_ok=True)
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="miles_jax_")
  try:
    yield tmp
    copy_tree(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
