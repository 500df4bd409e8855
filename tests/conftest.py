"""Test-wide settings: 8 simulated CPU devices, quiet TensorFlow, no GPU grabbing; tests/support/
(helpers, the PyTorch reference model, the GCS emulator, multi-host workers) on sys.path; the
`slow` marker (`python -m pytest -q -m "not slow" tests` is the fast tier); the GCS emulator
fixture (`gcs`) shared by the tests that read or write gs://."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

SUPPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support")
sys.path.insert(0, SUPPORT)

# One persistent XLA compilation cache for the session, read and written by this process and by
# every CLI a test starts (they inherit the environment): the tests compile the same demo-sized
# programs again and again (each `python -m miles_jax.train` run, each resume, each process of a
# multi-host run), and a warm entry turns a 6-step demo run's 54 s into 34 s here. Set before JAX
# is imported (it reads these at import). A test that checks the trainer's own cache
# (`train.compilation_cache`) drops the variable from its subprocess's environment.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="miles_jax_tests_xla_cache_")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_SESSION_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

from helpers import free_port, xla_flags  # noqa: E402  (JAX not initialised yet)

# 8 simulated devices; -O0 LLVM (helpers.FAST_COMPILE_FLAG) for the subprocesses that inherit it
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The process set-up the commands make (importing miles_jax makes none): TensorFlow's C++
# start-up lines stay out of the test output, gs:// settings as the CLIs have them.
from miles_jax import cli  # noqa: E402

cli.setup_process()


def pytest_unconfigure(config):
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: multi-process, fault-injection, benchmark-script and end-to-end tests "
      "(minutes on 2 cores); the fast tier is `-m \"not slow\"`")


@pytest.fixture(scope="module")
def gcs():
  """The emulator on 127.0.0.1 (tests/support/gcs_emulator.py) with bucket `bucket`; this process
  reads it through miles_jax.paths. Yields its URL (what STORAGE_EMULATOR_HOST is set to)."""
  from miles_jax import paths
  port = free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(SUPPORT, "gcs_emulator.py"),
                           str(port), "bucket"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("the GCS emulator did not start")
      time.sleep(0.2)
  url = f"http://127.0.0.1:{port}"
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  os.environ["STORAGE_EMULATOR_HOST"] = url
  os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
  paths.configure()
  try:
    yield url
  finally:
    proc.kill()
    proc.wait()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pytest-xdist): one worker per core, but no more than memory allows — a worker's
  tests start subprocesses of ~2 GiB each (TensorFlow + JAX + a compile), so ~6 GiB per worker."""
  try:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError):
    mem_gib = 8.0
  return max(1, min(os.cpu_count() or 1, int(mem_gib // 6)))
