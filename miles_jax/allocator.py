"""Host memory allocator settings for CPU runs: stop XLA:CPU's step buffers being paged in again
every step.

XLA:CPU allocates a step's temporaries (gigabytes at base size) with `malloc` from a worker
thread. glibc serves such requests with `mmap` and gives them back with `munmap` when the step
frees them, so every step page-faults its working set in again, 4 KiB at a time (transparent
huge pages are in `madvise` mode on most distributions). Measured on a 2-core AMD EPYC, base
model, batch 2, f32 contrastive step (`benchmarks/train_step.py`): ~700,000 minor page faults
per step and ~40 % of the step's wall time in the kernel. Two sets of glibc tunables:

- `hugepages`: `glibc.malloc.hugetlb=1` -- glibc asks for transparent huge pages on what it maps
  (512x fewer faults): the base step 10.5 -> 8.9 s, the tiny demo 7.4-8.0 -> 8.5-10.5 steps/s
  (two runs).
- `resident`: also `mmap_max=0`, `arena_max=1` and a 64 GiB `trim_threshold` -- every thread
  allocates from the main heap and nothing is given back, so after the first step the same
  memory is reused (0 faults per step): the base step 10.5 -> 6.9 s. One arena is what makes
  it work (a worker thread's arena serves large requests with `mmap` whatever `mmap_max` says)
  and also what costs the tiny demo, whose tf.data threads then contend for that arena:
  5.3-5.9 steps/s. (`mallopt` cannot set a trim threshold above 2 GiB, hence the environment.)

glibc reads GLIBC_TUNABLES only when a process starts. The package's commands leave the process
as it is (no re-execution: a TPU / GPU run never needs this, and a command that replaces itself
surprises debuggers and launchers); the two CPU places that start the processes set them:
launch/local.sh exports them before the demo's commands (`print_exports`), and the benchmarks
start their workers with them (`tuned_environ`, `reexec_with`). Either applies them only to a
CPU-only run (JAX_PLATFORMS=cpu, or no GPU plugin and no TPU chip: libtpu installed on a
CPU host, e.g. for `python -m miles_jax.plan`, does not count) on glibc Linux, and not when
GLIBC_TUNABLES has a `glibc.malloc` setting of the user's. A base-size CPU run by hand:
`eval "$(python -c 'from miles_jax import allocator; allocator.print_exports(768)')"`.
`MILES_JAX_MALLOC` picks the set:
`auto` (default: `resident` for a video width >= 384 -- base-size models, whose step buffers
dominate; `hugepages` for the tiny demo models), `hugepages`, `resident`, or `off`.
The cost of `resident`: the process keeps its peak heap until it exits.
"""
from __future__ import annotations

import importlib.util
import os
import sys

ENV = "MILES_JAX_MALLOC"
MODES = ("auto", "hugepages", "resident", "off")
TUNABLES = {
    "hugepages": "glibc.malloc.hugetlb=1",
    "resident": ("glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
                 "glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1"),
}
RESIDENT_MIN_WIDTH = 384  # auto: `resident` from this video width up (base: 768; small: 192)
_DONE = "MILES_JAX_MALLOC_APPLIED"  # set in the re-executed process: never loop


# PCI device IDs of TPU chips (vendor 0x1ae0, Google), as JAX's own check lists them
# (jax._src.hardware_utils): v3, v4, v5p, v5e, v6e, 7x and one unnamed.
_TPU_PCI_IDS = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def tpu_attached() -> bool:
  """True on a TPU VM: a TPU chip on this host's PCI bus (what JAX checks before it starts the
  TPU runtime). An installed libtpu alone (the `[tpu]` extra, for `plan`) is not a TPU."""
  import glob
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() != "0x1ae0":
          continue
      with open(os.path.join(os.path.dirname(vendor), "device")) as f:
        if f.read().strip() in _TPU_PCI_IDS:
          return True
    except OSError:
      continue
  return False


def _gpu_plugin_installed() -> bool:
  try:
    import jax_plugins  # namespace package of the CUDA / ROCm plugins
  except ImportError:
    return False
  import pkgutil
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def libtpu_without_tpu() -> bool:
  """libtpu is installed but this host has no TPU chip and no GPU plugin: JAX would start the
  TPU runtime (which prints warnings, finding no TPU) and then fall back to the CPU."""
  return (importlib.util.find_spec("libtpu") is not None and not tpu_attached()
          and not _gpu_plugin_installed())


def _cpu_only(environ) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return all(p.strip() == "cpu" for p in platforms.split(","))
  if importlib.util.find_spec("libtpu") is not None and tpu_attached():
    return False
  return not _gpu_plugin_installed()


def _glibc() -> bool:
  try:
    return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith(
        "glibc")
  except (AttributeError, ValueError, OSError):
    return False


def mode(environ=None, video_width: int | None = None) -> str:
  """The tunables set MILES_JAX_MALLOC asks for ('auto' resolved by the video width)."""
  environ = os.environ if environ is None else environ
  value = environ.get(ENV, "auto").strip().lower() or "auto"
  value = {"0": "off", "false": "off", "no": "off", "1": "auto"}.get(value, value)
  if value not in MODES:
    raise ValueError(f"{ENV}={environ.get(ENV)!r}: use one of {', '.join(MODES)}")
  if value == "auto":
    return "resident" if (video_width or 0) >= RESIDENT_MIN_WIDTH else "hugepages"
  return value


def tuned_environ(environ=None, video_width: int | None = None) -> dict | None:
  """A copy of `environ` (default os.environ) with `mode`'s tunables added to GLIBC_TUNABLES,
  or None when it should stay as it is: MILES_JAX_MALLOC=off, already applied, `glibc.malloc`
  tunables of the user's, not glibc Linux, or an accelerator run (unless a set is named)."""
  environ = dict(os.environ if environ is None else environ)
  chosen = mode(environ, video_width)
  current = environ.get("GLIBC_TUNABLES", "")
  if chosen == "off" or environ.get(_DONE) or "glibc.malloc." in current or not _glibc():
    return None
  named = environ.get(ENV, "auto").strip().lower() in TUNABLES
  if not named and not _cpu_only(environ):
    return None
  environ["GLIBC_TUNABLES"] = f"{current}:{TUNABLES[chosen]}" if current else TUNABLES[chosen]
  environ[_DONE] = chosen
  return environ


def reexec_if_needed(video_width: int | None = None) -> None:
  """Re-executes this command with `mode`'s allocator tunables (see the module doc); returns
  when nothing is to be done. Call it before JAX starts its backend. Same PID, arguments and
  other environment."""
  env = tuned_environ(video_width=video_width)
  argv = getattr(sys, "orig_argv", None)
  if env is None or not argv or len(argv) < 2:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def reexec_with(chosen: str, video_width: int | None = None) -> None:
  """`reexec_if_needed` under MILES_JAX_MALLOC=`chosen` (a benchmark's --malloc flag), which the
  re-executed process and its workers inherit."""
  os.environ[ENV] = chosen
  reexec_if_needed(video_width)


def print_exports(video_width: int | None = None) -> int:
  """Prints the shell line that exports `tuned_environ`'s tunables (nothing when the environment
  should stay as it is), for `eval` in a launch script; 2 after printing a bad MILES_JAX_MALLOC
  value to stderr, else 0."""
  import shlex
  try:
    env = tuned_environ(video_width=video_width)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if env is not None:
    print(f"export GLIBC_TUNABLES={shlex.quote(env['GLIBC_TUNABLES'])} "
          f"{_DONE}={shlex.quote(env[_DONE])}")
  return 0
