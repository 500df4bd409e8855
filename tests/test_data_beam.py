"""prepare --runner=DirectRunner (miles_jax/data/beam.py) against the process-pool path on the
same tiny clips: the same shards record for record, the same sidecars and report.json, an
idempotent rerun, gs:// output, and one-line exit-2 errors for a bad runner or a missing extra."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import tensorflow as tf

from miles_jax import paths
from miles_jax.data import prepare
from test_data_prepare import write_mp4

pytest.importorskip("apache_beam")  # the [beam] extra; .ci/run installs it


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  """Three clips, one too short for 4 frames, a corrupt file; the csv also names a missing file
  and has an empty caption."""
  d = tmp_path_factory.mktemp("media")
  write_mp4(str(d / "v0.mp4"), num_frames=8, seed=0)
  write_mp4(str(d / "v1.mp4"), num_frames=8, h=32, w=48, seed=1)
  write_mp4(str(d / "v2.mp4"), num_frames=3, seed=2)  # short: 3 < 4 frames
  write_mp4(str(d / "v3.mp4"), num_frames=8, seed=3)
  (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(1500))
  ann = d / "ann.csv"
  ann.write_text("video_path,caption\nv0.mp4,zero\nv1.mp4,one\nmissing.mp4,gone\n"
                 "v2.mp4,two\ncorrupt.mp4,broken\nv3.mp4,\nv0.mp4,zero again\n")
  return str(d)


def _args(media, out, *extra):
  return ["--format", "csv", "--annotations", os.path.join(media, "ann.csv"), "--media_dir",
          media, "--out", out, "--num_shards", "3", "--frames_per_clip", "4", "--resolution",
          "24", "--workers", "1", *extra]


def _shards(out):
  """{file name: [raw record bytes]} of every shard, and the hidden sidecar/count files' text."""
  names = sorted(paths.Path(out).iterdir(), key=str)
  recs = {}
  for p in names:
    if p.name.endswith(".tfrecord"):
      with paths.local_file(os.fspath(p)) as local:  # gs:// through the path layer
        recs[p.name] = [r.numpy() for r in tf.data.TFRecordDataset(local)]
  hidden = {p.name: p.read_text() for p in names if p.name.startswith(".")}
  return recs, hidden


def _report(out):
  rep = json.loads(paths.read_text(os.path.join(out, "report.json")))["train"]
  rep.pop("seconds")
  return rep


def _mtimes(out):
  return {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)
          if f.endswith(".tfrecord")}


@pytest.fixture(scope="module")
def pool_out(media, tmp_path_factory):
  """The pool path's output, written by the command in another process (another hash seed:
  records must not depend on the process that serialized them)."""
  out = str(tmp_path_factory.mktemp("pool") / "out")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONHASHSEED": "12345",
         "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  r = subprocess.run([sys.executable, "-m", "miles_jax.data.prepare", *_args(media, out)],
                     env=env, capture_output=True, text=True, cwd=root)
  assert r.returncode == 0, r.stderr[-2000:]
  return out


@pytest.mark.slow
def test_direct_runner_writes_what_the_pool_writes_and_reruns_idempotently(media, pool_out,
                                                                            tmp_path):
  out = str(tmp_path / "beam")
  assert prepare.main(_args(media, out, "--runner=DirectRunner")) == 0
  want_recs, want_hidden = _shards(pool_out)
  recs, hidden = _shards(out)
  assert sorted(os.listdir(out)) == sorted(os.listdir(pool_out))  # no task files left behind
  assert recs == want_recs and hidden == want_hidden
  assert sum(map(len, recs.values())) == 3  # v0, v1, v2 (short)
  rep = _report(out)
  assert rep == _report(pool_out)
  assert rep["written"] == 3 and rep["items"] == 6 and rep["resumed_shards"] == []
  assert {s["video_id"]: s["reason"].split(":")[0].split(" ")[0] for s in rep["skipped"]} == {
      "missing.mp4": "missing", "corrupt.mp4": "unreadable", "v3.mp4": "no"}
  assert rep["short"] == [{"video_id": "v2.mp4", "frames": 3}]

  # a rerun into the same output writes nothing and reports the same
  before = _mtimes(out)
  assert prepare.main(_args(media, out, "--runner=DirectRunner")) == 0
  assert _mtimes(out) == before and _shards(out) == (recs, hidden)
  again = _report(out)
  assert again.pop("resumed_shards") == sorted(recs)
  assert again == {k: v for k, v in rep.items() if k != "resumed_shards"}

  # after a failure that lost one shard (a temp file left instead), only it is redone, and no
  # record appears twice
  lost = sorted(recs)[0]
  os.remove(os.path.join(out, lost))
  open(os.path.join(out, lost + ".tmp"), "w").write("partial")
  assert prepare.main(_args(media, out, "--runner=DirectRunner")) == 0
  assert _shards(out) == (recs, hidden) and not os.path.exists(os.path.join(out, lost + ".tmp"))
  assert _report(out)["resumed_shards"] == sorted(recs)[1:]


def test_direct_runner_writes_to_gcs_through_the_path_layer(media, pool_out, gcs):
  out = "gs://bucket/prepared"
  assert prepare.main(_args(media, out, "--runner=DirectRunner")) == 0
  assert _shards(out) == _shards(pool_out)
  assert _report(out) == _report(pool_out)
  # and the videos read from the bucket too (what Dataflow workers do)
  paths.copy_tree(media, "gs://bucket/media")
  out = "gs://bucket/prepared_from_gcs"
  args = _args(media, out, "--runner=DirectRunner")
  args[args.index("--media_dir") + 1] = "gs://bucket/media"
  assert prepare.main(args) == 0
  assert _shards(out)[0] == _shards(pool_out)[0]
  rep = _report(out)
  assert rep["written"] == 3 and rep["short"] == _report(pool_out)["short"]
  assert {s["video_id"]: s["reason"] for s in rep["skipped"]}["missing.mp4"] == (
      "missing file gs://bucket/media/missing.mp4")


@pytest.mark.parametrize("extra, says", [
    (["--runner=SparkyRunner"], "--runner=SparkyRunner: use one of DirectRunner, "),
    (["--beam_option=region=x"], "--beam_option needs --runner"),
    (["--runner=DirectRunner", "--beam_option=--region=x"], "--beam_option=--region=x: write"),
])
def test_bad_runner_flags_exit_2_with_one_line(media, tmp_path, capsys, extra, says):
  out = str(tmp_path / "out")
  assert prepare.main(_args(media, out, *extra)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: " + says), err
  assert not os.path.exists(out)


def test_runner_without_the_beam_extra_exits_2_saying_what_to_install(media, tmp_path, capsys,
                                                                      monkeypatch):
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # `import apache_beam` now fails
  assert prepare.main(_args(media, str(tmp_path / "out"), "--runner=DataflowRunner")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: --runner=DataflowRunner needs Apache Beam, which is not installed: "
                 "pip install 'miles_jax[beam]' (apache-beam[gcp]==2.77.0)"]


def _dataflow_dry_run(*args, **env):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PROJECT": "my-project", "BUCKET": "gs://my-bucket/", **env}
  return subprocess.run(["bash", os.path.join(root, "launch", "prepare_dataflow.sh"),
                         "--dry-run", *args], capture_output=True, text=True, env=env)


def test_dataflow_launcher_dry_run_prints_a_command_prepare_and_beam_accept():
  r = _dataflow_dry_run("--format=webvid", "--annotations=results_2M_train.csv",
                        "--media_dir=gs://my-bucket/videos", "--out", "gs://my-bucket/shards",
                        "--num_shards=4096", REGION="europe-west4", MACHINE_TYPE="c3-highcpu-22",
                        MAX_WORKERS="50")
  assert r.returncode == 0, r.stderr
  argv = shlex.split(r.stdout)
  assert argv[1:3] == ["-m", "miles_jax.data.prepare"]
  from miles_jax import cli
  from miles_jax.data import beam
  a = cli.parse(prepare.define_flags, argv[3:], "prepare")  # exits 2 on any flag it rejects
  assert a.runner == "DataflowRunner" and a.out == "gs://my-bucket/shards"
  assert beam.check(a.runner, a.beam_option) is None
  from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                    SetupOptions, StandardOptions,
                                                    WorkerOptions)
  opts = PipelineOptions(beam.pipeline_args(a.runner, a.beam_option, a.workers))
  assert opts.view_as(StandardOptions).runner == "DataflowRunner"
  cloud = opts.view_as(GoogleCloudOptions)
  assert (cloud.project, cloud.region) == ("my-project", "europe-west4")
  assert cloud.temp_location == "gs://my-bucket/dataflow/tmp"
  worker = opts.view_as(WorkerOptions)
  assert (worker.machine_type, worker.max_num_workers) == ("c3-highcpu-22", 50)
  setup_file = opts.view_as(SetupOptions).setup_file
  assert os.path.isfile(setup_file) and setup_file.endswith("setup.py")


def test_dataflow_launcher_refuses_local_paths_and_needs_its_settings():
  r = _dataflow_dry_run("--format=csv", "--annotations=a.csv", "--media_dir=/data/videos",
                        "--out=gs://b/o")
  assert r.returncode == 2 and "--media_dir=/data/videos" in r.stderr
  r = _dataflow_dry_run("--format=csv", "--out", "shards/")
  assert r.returncode == 2 and "--out=shards/" in r.stderr
  r = _dataflow_dry_run("--format=csv", PROJECT="")
  assert r.returncode != 0 and "PROJECT" in r.stderr
