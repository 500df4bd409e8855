"""Joining a multi-host job: when to call `jax.distributed.initialize()`, the start-up line, and
the check that every process sees the accelerators the job gave it.

JAX's own cluster detection decides (Cloud TPU VMs through the GCE metadata server, TPUs on GKE,
SLURM, Open MPI, Kubernetes, `JAX_COORDINATOR_ADDRESS`); explicit flags win. Without a client a
multi-host job silently runs as N independent single-host jobs — and orbax's async
checkpointing fails — so initialising is the default whenever a cluster is detected.
"""
from __future__ import annotations

import os
import re


class DeviceMismatch(RuntimeError):
  """A process sees fewer accelerators than the job asked for."""


def detected_cluster(env=None) -> str | None:
  """The cluster environment JAX's auto-detection would use, or None on a lone machine."""
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  try:
    from jax._src import clusters  # the list jax.distributed.initialize() itself walks
    for kind in clusters.ClusterEnv._cluster_types:
      if not kind.opt_in_only_method and kind.is_env_present():
        return kind.__name__
    return None
  except (ImportError, AttributeError):  # the private list moved: the documented variables
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")):
      return "SlurmCluster"
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
      return "GkeTpuCluster"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None,
               mode: str = "auto") -> str | None:
  """Calls jax.distributed.initialize() when `mode` is on, or auto and a cluster (or an explicit
  coordinator) is there -> what was used (None: single process, no client)."""
  import jax
  if coordinator_address:  # explicit flags win (CPU tests on 127.0.0.1 use gloo collectives)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               coordinator_bind_address=coordinator_address)
    return "flags"
  cluster = detected_cluster()
  if mode == "on" or (mode == "auto" and cluster):
    jax.distributed.initialize(local_device_ids=local_device_ids)
    return cluster or "on"
  return None


def _first_int(value: str | None) -> int | None:
  m = re.match(r"\s*(\d+)", value or "")
  return int(m.group(1)) if m else None


def expected_local_devices(env=None) -> int | None:
  """Accelerators per process the job asked for, where the scheduler says (SLURM), else None.

  SLURM: --gpus-per-task, or the node's GPUs (SLURM_GPUS_ON_NODE) over its tasks
  (SLURM_NTASKS_PER_NODE, else the first count of SLURM_TASKS_PER_NODE such as "8(x2)").
  """
  env = os.environ if env is None else env
  per_task = _first_int(env.get("SLURM_GPUS_PER_TASK"))
  if per_task:
    return per_task
  on_node = _first_int(env.get("SLURM_GPUS_ON_NODE"))
  tasks = _first_int(env.get("SLURM_NTASKS_PER_NODE")) or _first_int(env.get("SLURM_TASKS_PER_NODE"))
  if on_node and tasks:
    return max(on_node // tasks, 1)
  return None


def startup_line(process_index: int, process_count: int, local: int, total: int,
                 platform: str, cluster: str | None) -> str:
  return (f"process {process_index}/{process_count} | {local} local {platform} devices | "
          f"{total} devices in all | {'cluster: ' + cluster if cluster else 'single process'}")


def check_local_devices(local: int, expected: int | None, process_index: int,
                        platform: str) -> None:
  """Raises DeviceMismatch when this process sees fewer accelerators than the job gave it."""
  if expected is None or local >= expected:
    return
  raise DeviceMismatch(
      f"process {process_index} sees {local} {platform} device(s) but the job gave each process "
      f"{expected}: with one task per node, JAX's SLURM detection hands each process one GPU "
      "(its SLURM_LOCALID). Run one task per GPU (--ntasks-per-node = GPUs per node, as "
      "launch/slurm.sbatch does) or pass --local_device_ids=0,1,...")


def report_and_check(cluster: str | None, expected: int | None = None) -> str:
  """Prints the start-up line (every process, one line each) and checks the device count."""
  import jax
  local = jax.local_device_count()
  platform = jax.default_backend()
  line = startup_line(jax.process_index(), jax.process_count(), local, jax.device_count(),
                      platform, cluster)
  print(line, flush=True)
  # SLURM's GPU counts say nothing about a CPU run (tests); there only an explicit ask counts.
  want = expected or (expected_local_devices() if platform != "cpu" else None)
  check_local_devices(local, want, jax.process_index(), platform)
  return line


def define_flags() -> None:
  """The multi-host flags of the CLIs that run on every host (train, evaluate)."""
  from absl import flags
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "auto: initialise jax.distributed when JAX's cluster detection finds a job "
                    "(Cloud TPU VM / GKE, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) or "
                    "--coordinator_address is given; on: always; off: never.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
  flags.DEFINE_integer("cpu_devices", None, "Simulated CPU devices per process (testing).")
  flags.DEFINE_list("local_device_ids", None, "Devices this process drives (e.g. 0,1,2,3); "
                    "default: what the cluster detection assigns.")
  flags.DEFINE_integer("expect_local_devices", None, "Fail unless this process sees at least "
                       "this many devices (default: SLURM's GPUs per task, where SLURM says).")


def init_from_flags() -> str:
  """jax.distributed when the job has several hosts (define_flags' flags), then one start-up line
  per process. Raises RuntimeError (DeviceMismatch, no coordinator reachable)."""
  import jax
  from absl import flags
  f = flags.FLAGS
  if f.cpu_devices:
    jax.config.update("jax_num_cpu_devices", f.cpu_devices)
  ids = [int(i) for i in f.local_device_ids] if f.local_device_ids else None
  used = initialize(f.coordinator_address, f.num_processes, f.process_id, ids, f.distributed)
  return report_and_check(used, f.expect_local_devices)


def init_from_flags_exit_code() -> int:
  """`init_from_flags()` for a CLI's main: 0, or 2 after printing the error to stderr."""
  import sys
  try:
    init_from_flags()
  except RuntimeError as e:  # DeviceMismatch, or no coordinator reachable
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
