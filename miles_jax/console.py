"""What the package writes to the console besides its own lines: C++ start-up logs and progress.

TensorFlow (tf.data, TFRecord I/O) writes absl C++ log lines while its shared libraries load and
when it first looks for GPUs: `oneDNN custom operations are on`, `Could not find cuda drivers`,
`failed call to cuInit` (an E line on every CPU machine) and `All log messages before
absl::InitializeLog() ...`. They are written before absl logging is initialised, when absl
prints every message whatever the level, so TF_CPP_MIN_LOG_LEVEL does not remove them. The only
handle is the file descriptor: `install()` (run by every command's `cli.setup_process()`;
importing the package does not) makes the first
`import tensorflow` of the process run with fd 2 captured, also hides the GPUs from TensorFlow
there (JAX owns them; tf.data runs on the host), and then writes back every captured line that
is not an absl-format `I/W/E` log line, so Python warnings and tracebacks still show.

`MILES_JAX_VERBOSE=1` or `--verbose` on any `python -m miles_jax.*` command turns this off (and
keeps absl/orbax INFO logs on).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import os
import re
import sys
import tempfile

VERBOSE_ENV = "MILES_JAX_VERBOSE"
# absl / glog prefix: severity, MMDD, time, thread id, file:line]  (F = fatal is always kept)
_LOG_LINE = re.compile(rb"^[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+\s+\S+:\d+\] ")
_PRE_INIT = b"WARNING: All log messages before absl::InitializeLog() is called"


def verbose() -> bool:
  """True when the user asked for library logs (MILES_JAX_VERBOSE=1 or --verbose)."""
  value = os.environ.get(VERBOSE_ENV, "").strip().lower()
  return value not in ("", "0", "false", "no")


def native_log_filter(data: bytes) -> bytes:
  """`data` without absl-format I/W/E lines and absl's pre-initialisation notice."""
  keep = [line for line in data.splitlines(keepends=True)
          if not _LOG_LINE.match(line) and not line.startswith(_PRE_INIT)]
  return b"".join(keep)


@contextlib.contextmanager
def quiet_native_logs():
  """Captures fd 2 for the block and writes back all but C++ log lines (no-op when verbose)."""
  if verbose():
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      rest = native_log_filter(tmp.read())
      if rest:
        os.write(2, rest)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Runs the process's first `import tensorflow` inside `quiet_native_logs()`."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname != "tensorflow":
      return None
    import importlib.machinery
    sys.meta_path.remove(self)  # one import per process; the rest find it in sys.modules
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
      return spec
    loader, exec_module = spec.loader, spec.loader.exec_module

    def quiet_exec_module(module):
      with quiet_native_logs():
        exec_module(module)
        try:  # the GPU lookup (cuInit) happens here, inside the capture
          module.config.set_visible_devices([], "GPU")
        except (RuntimeError, ValueError, AttributeError):
          pass  # devices already initialised, or a TensorFlow without GPU support

    loader.exec_module = quiet_exec_module  # this loader instance serves only this module
    return spec


def install():
  """Sets the logging environment before TensorFlow / jaxlib load (cli.setup_process)."""
  if any(a.lower() in ("--verbose", "--verbose=true", "--verbose=1") for a in sys.argv[1:]):
    os.environ[VERBOSE_ENV] = "1"  # inherited by worker processes
  if verbose():
    return
  # The lines TensorFlow logs later go through its own filter: 3 also drops the spurious
  # `E... util.cc] oneDNN supports DT_INT64 only on platforms with AVX-512` the first tf.data
  # batch logs on x86 CPUs. TensorFlow only feeds data here; its op failures still reach Python
  # as exceptions.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  if "tensorflow" not in sys.modules and not any(
      isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())


def progress(iterable=None, total=None, desc=None, unit="it", delay=0.0, disable=False,
             **kwargs):
  """A tqdm bar with ETA on stderr. When stderr is not a terminal (CI, SLURM, TPU worker logs)
  it writes plain lines instead of redrawing one with `\\r`: a line per ~5 % of the work, at
  most one per 30 s, and the final one."""
  from tqdm import tqdm
  tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
  if not tty:
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
      total = len(iterable)
    # maxinterval=inf: tqdm's monitor thread would otherwise force a redraw every 10 s
    kwargs.update(file=_Lines(sys.stderr), mininterval=30.0, maxinterval=float("inf"),
                  miniters=max(1, (total or 0) // 20), ncols=100)
  return tqdm(iterable, total=total, desc=desc, unit=unit, delay=delay, disable=disable,
              dynamic_ncols=tty, **kwargs)


class _Lines:
  """A file for tqdm that turns each redraw into one plain line (no carriage returns)."""

  def __init__(self, f):
    self._f = f

  def write(self, s):
    s = s.replace("\r", "").strip()
    if s:
      self._f.write(s + "\n")

  def flush(self):
    self._f.flush()
