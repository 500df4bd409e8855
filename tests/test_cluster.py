"""Joining a multi-host job (miles_jax/cluster.py): JAX's cluster detection decides when
jax.distributed is initialised (a gcloud TPU VM has no TPU_WORKER_HOSTNAMES), the start-up
line, and the failure when a process sees fewer accelerators than the job gave it (SLURM with
one task per node hands each process GPU 0 only)."""
import os
import subprocess
import sys

import pytest

from miles_jax import cluster

import helpers  # noqa: E402  (tests/support/ is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID", "SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE",
              "SLURM_TASKS_PER_NODE", "SLURM_GPUS_PER_TASK", "TPU_WORKER_HOSTNAMES",
              "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture
def clean_env(monkeypatch):
  for k in SLURM_VARS:
    monkeypatch.delenv(k, raising=False)
  return monkeypatch


def test_lone_machine_is_no_cluster(clean_env):
  assert cluster.detected_cluster() is None


def test_gcloud_tpu_vm_is_detected_without_gke_variables(clean_env):
  """A TPU VM created with `gcloud compute tpus tpu-vm create` is found through the metadata
  server (JAX's GceTpuCluster), not through TPU_WORKER_HOSTNAMES, which only GKE sets."""
  from jax._src.clusters import cloud_tpu_cluster
  clean_env.setattr(cloud_tpu_cluster.GceTpuCluster, "is_env_present", classmethod(lambda c: True))
  assert cluster.detected_cluster() == "GceTpuCluster"


def test_slurm_job_is_detected(clean_env):
  for k, v in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16",
               "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}.items():
    clean_env.setenv(k, v)
  assert cluster.detected_cluster() == "SlurmCluster"


@pytest.mark.parametrize("env,want", [
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}, 8),  # one task per node
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8"}, 1),  # one task per GPU
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x2)"}, 1),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_TASKS_PER_NODE": "2,2"}, 2),
    ({"SLURM_GPUS_PER_TASK": "4", "SLURM_GPUS_ON_NODE": "8"}, 4),
    ({}, None),
])
def test_expected_local_devices(env, want):
  assert cluster.expected_local_devices(env) == want


def test_one_task_per_node_fails_naming_the_fix():
  with pytest.raises(cluster.DeviceMismatch, match="one task per GPU"):
    cluster.check_local_devices(1, cluster.expected_local_devices(
        {"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}), 0, "gpu")
  cluster.check_local_devices(1, 1, 5, "gpu")
  cluster.check_local_devices(8, 8, 0, "gpu")
  cluster.check_local_devices(1, None, 0, "gpu")


def test_startup_line():
  line = cluster.startup_line(3, 16, 1, 16, "gpu", "SlurmCluster")
  assert line == "process 3/16 | 1 local gpu devices | 16 devices in all | cluster: SlurmCluster"


def test_train_prints_the_line_and_refuses_too_few_devices(tmp_path):
  """End to end through the CLI, before any data or compile: 4 devices seen, 8 asked for."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.xla_flags(),
             TF_CPP_MIN_LOG_LEVEL="2")
  for k in SLURM_VARS:
    env.pop(k, None)
  r = subprocess.run([sys.executable, "-m", "miles_jax.train", "--config=configs/demo.py",
                      f"--workdir={tmp_path / 'w'}", "--cpu_devices=4", "--distributed=off",
                      "--expect_local_devices=8"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "process 0/1 | 4 local cpu devices | 4 devices in all | single process" in r.stdout
  assert "sees 4 cpu device(s) but the job gave each process 8" in r.stderr
  assert not (tmp_path / "w").exists()
