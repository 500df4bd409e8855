"""Test-wide settings: 8 simulated CPU devices, quiet TensorFlow, no GPU grabbing; tests/support/
(helpers, the PyTorch reference model, the GCS emulator, multi-host workers) on sys.path; the
`slow` marker (`python -m pytest -q -m "not slow" tests` is the fast tier); the GCS emulator
fixture (`gcs`) shared by the tests that read or write gs://."""
import os
import socket
import subprocess
import sys
import time

import pytest

SUPPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support")
sys.path.insert(0, SUPPORT)

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
