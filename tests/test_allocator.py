"""The CPU allocator tunables (miles_jax/allocator.py): which runs get which set, how
launch/local.sh applies them, and that a re-executed process (the benchmarks') stops page-faulting a buffer the size of a step's in again on every call."""
import os
import subprocess
import sys
import textwrap

import pytest

from miles_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {"JAX_PLATFORMS": "cpu"}


def test_auto_picks_the_set_by_model_width():
  env = allocator.tuned_environ(CPU, video_width=768)
  assert env["GLIBC_TUNABLES"] == allocator.TUNABLES["resident"]
  assert "glibc.malloc.arena_max=1" in env["GLIBC_TUNABLES"]
  env = allocator.tuned_environ(CPU, video_width=64)
  assert env["GLIBC_TUNABLES"] == allocator.TUNABLES["hugepages"]
  assert allocator.tuned_environ(CPU)["GLIBC_TUNABLES"] == allocator.TUNABLES["hugepages"]


@pytest.mark.parametrize("value", ["off", "0", "false"])
def test_off(value):
  assert allocator.tuned_environ({**CPU, allocator.ENV: value}, 768) is None


def test_the_users_own_tunables_win_and_others_are_kept():
  assert allocator.tuned_environ({**CPU, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, 768) is None
  env = allocator.tuned_environ({**CPU, "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"},
                                64)
  assert env["GLIBC_TUNABLES"] == "glibc.rtld.optional_static_tls=512:glibc.malloc.hugetlb=1"


def test_accelerator_runs_are_left_alone_unless_a_set_is_named():
  assert allocator.tuned_environ({"JAX_PLATFORMS": "tpu"}, 768) is None
  assert allocator.tuned_environ({"JAX_PLATFORMS": "cuda,cpu"}, 768) is None
  env = allocator.tuned_environ({"JAX_PLATFORMS": "tpu", allocator.ENV: "resident"}, 64)
  assert env["GLIBC_TUNABLES"] == allocator.TUNABLES["resident"]


def test_applied_once():
  env = allocator.tuned_environ(CPU, 768)
  assert allocator.tuned_environ(env, 768) is None


def test_bad_value_names_the_variable():
  with pytest.raises(ValueError, match="MILES_JAX_MALLOC='huge'.*auto, hugepages, resident, off"):
    allocator.mode({allocator.ENV: "huge"})


def test_local_sh_exports_the_tunables_and_rejects_a_bad_value():
  """launch/local.sh evals what print_exports prints (the CLIs no longer re-execute themselves):
  an export of the tiny demo's set that a shell takes, nothing when the user's own tunables are
  set, and a bad MILES_JAX_MALLOC as one error line and exit 2."""
  line = [ln for ln in open(os.path.join(ROOT, "launch", "local.sh")) if "print_exports" in ln]
  assert len(line) == 1 and "print_exports(64)" in line[0]
  code = "import sys; from miles_jax import allocator; sys.exit(allocator.print_exports(64))"
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator._DONE,
                                                            allocator.ENV)}
  run = lambda env: subprocess.run(
      ["bash", "-c", f"eval \"$({sys.executable} -c '{code}')\"; echo \"$GLIBC_TUNABLES\""],
      cwd=ROOT, capture_output=True, text=True, env={**base, **CPU, **env}, timeout=120)
  r = run({})
  assert r.returncode == 0 and r.stdout.strip() == allocator.TUNABLES["hugepages"], r
  r = run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
  assert r.stdout.strip() == "glibc.malloc.arena_max=4"
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     env={**base, **CPU, allocator.ENV: "huge"}, timeout=120)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "MILES_JAX_MALLOC='huge'" in r.stderr


# Re-executes itself with the width-768 set, then makes a 64 MiB output buffer four times (as a
# step's outputs and temporaries are made and freed) and prints its PIDs, tunables and the minor
# page faults of the last three calls.
SCRIPT = textwrap.dedent("""
    import os, resource, sys
    pid = os.environ.get("FIRST_PID") or str(os.getpid())
    os.environ["FIRST_PID"] = pid
    from miles_jax import allocator
    allocator.reexec_if_needed(768)
    import jax, jax.numpy as jnp
    x = jnp.ones((4096, 4096), jnp.float32)
    f = jax.jit(lambda x: x * 2.0 + 1.0)
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
      y = f(x)
      y.block_until_ready()
      del y
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print("|".join([pid, str(os.getpid()), os.environ.get("GLIBC_TUNABLES", ""),
                    str(faults // 3)]))
""")


def _run(mode: str):
  env = {**os.environ, **CPU, allocator.ENV: mode, "PYTHONPATH": ROOT}
  for key in ("GLIBC_TUNABLES", "MILES_JAX_MALLOC_APPLIED", "FIRST_PID"):
    env.pop(key, None)
  r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode == 0, r.stderr
  first, pid, tunables, faults = r.stdout.strip().splitlines()[-1].split("|")
  return first, pid, tunables, int(faults)


@pytest.mark.slow
def test_resident_heap_stops_the_page_faults():
  first, pid, tunables, faults_off = _run("off")
  assert tunables == ""
  # 64 MiB = 16384 pages of 4 KiB, faulted in on every call without the tunables
  assert faults_off > 8000, faults_off
  first, pid, tunables, faults = _run("auto")
  assert first == pid  # re-executed in place: launchers and signals see the same process
  assert tunables == allocator.TUNABLES["resident"]
  assert faults < faults_off / 20, (faults, faults_off)


def test_libtpu_without_a_tpu_chip_is_still_a_cpu_run(monkeypatch):
  """libtpu installed on a CPU host (the [tpu] extra, for `python -m miles_jax.plan`): the CPU
  tunables still apply; on a TPU VM (a chip on the PCI bus) they do not."""
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: object() if name == "libtpu" else real(name, *a))
  monkeypatch.setattr(allocator, "_gpu_plugin_installed", lambda: False)
  monkeypatch.setattr(allocator, "tpu_attached", lambda: False)
  assert allocator.libtpu_without_tpu()
  assert allocator.tuned_environ({}, 768)["GLIBC_TUNABLES"] == allocator.TUNABLES["resident"]
  monkeypatch.setattr(allocator, "tpu_attached", lambda: True)
  assert not allocator.libtpu_without_tpu()
  assert allocator.tuned_environ({}, 768) is None
