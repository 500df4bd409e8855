"""console.py / cli.py: commands start without C++ log lines, one flag style with dashed aliases."""
import os
import re
import subprocess
import sys

import pytest
from absl import flags

import helpers  # noqa: E402
from helpers import ROOT
from miles_jax import cli, console
from miles_jax.data import prepare, synthetic

# What TensorFlow 2.21 writes on a CPU machine while it loads (absl, before InitializeLog).
NOISE = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
         b"I0000 00:00:1795429534.894592    7826 port.cc:153] oneDNN custom operations are on.\n"
         b"I0000 00:00:1795429534.895794    7826 cudart_stub.cc:31] Could not find cuda drivers on "
         b"your machine, GPU will not be used.\n"
         b"E0000 00:00:1795429539.574352    7826 cuda_platform.cc:52] failed call to cuInit: "
         b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
         b"W1123 10:25:40.123456  7826 gpu_device.cc:2344] Cannot dlopen some GPU libraries.\n")
KEEP = (b"/x/site-packages/google/protobuf/runtime_version.py:98: UserWarning: Protobuf gencode\n"
        b"  warnings.warn(\n"
        b"F0000 00:00:1795429539.574352    7826 check.cc:1] Check failed: a fatal line stays\n")
LOG_LINE = re.compile(r"^[IWE]\d{4} |absl::InitializeLog", re.M)


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.xla_flags())
  for k in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES", console.VERBOSE_ENV):
    env.pop(k, None)  # as in a user's fresh shell
  return env


def test_filter_drops_absl_lines_and_keeps_the_rest():
  lines = NOISE.splitlines(keepends=True)
  assert console.native_log_filter(b"".join(lines[:2]) + KEEP + b"".join(lines[2:])) == KEEP
  assert console.native_log_filter(b"plain output\n") == b"plain output\n"


def test_quiet_native_logs_on_the_file_descriptor(capfd, monkeypatch):
  monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
  with console.quiet_native_logs():
    os.write(2, NOISE + KEEP)  # C++ writes to fd 2 directly, bypassing sys.stderr
  assert capfd.readouterr().err == KEEP.decode()
  monkeypatch.setenv(console.VERBOSE_ENV, "1")
  with console.quiet_native_logs():
    os.write(2, NOISE)
  assert capfd.readouterr().err == NOISE.decode()


@pytest.mark.slow
def test_a_command_starts_without_cpp_logs_unless_verbose(tmp_path):
  cmd = [sys.executable, "-m", "miles_jax.data.synthetic", f"--out={tmp_path / 'd'}",
         "--train=4", "--eval=2", "--frames=2", "--resolution=16"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert not LOG_LINE.search(r.stderr), r.stderr  # TF was loaded and wrote records
  assert r.stdout.startswith("[synthetic] 4 train + 2 eval clips")
  # The switch gives the lines back: the same command with --verbose shows TensorFlow's.
  r = subprocess.run(cmd + ["--verbose"], cwd=ROOT, capture_output=True, text=True,
                     env=_env(), timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert LOG_LINE.search(r.stderr), r.stderr


def test_underscored_aliases():
  fv = flags.FlagValues()
  prepare.define_flags(fv)
  flags.DEFINE_bool("overwrite", False, "", flag_values=fv)
  args = ["--media-dir=/m", "--num-shards", "3", "--frames_per_clip=2", "--no-overwrite",
          "--config.model.video-width=3", "--", "--num-shards=9"]
  assert cli.underscored(args, fv) == [
      "--media_dir=/m", "--num_shards", "3", "--frames_per_clip=2", "--nooverwrite",
      "--config.model.video-width=3", "--", "--num-shards=9"]


@pytest.mark.parametrize("style", ["underscore", "dash"])
def test_prepare_flags_both_spellings(style):
  args = {"format": "csv", "annotations": "a.csv", "media_dir": "videos", "out": "o",
          "num_shards": "3", "frames_per_clip": "2", "jpeg_quality": "80", "video_list": "l.txt"}
  name = (lambda k: k) if style == "underscore" else (lambda k: k.replace("_", "-"))
  a = cli.parse(prepare.define_flags, [f"--{name(k)}={v}" for k, v in args.items()], "prepare")
  assert (a.media_dir, a.num_shards, a.frames_per_clip, a.jpeg_quality, a.video_list) == (
      "videos", 3, 2, 80, "l.txt")


def test_bad_flags_exit_2(capsys):
  for argv in (["--out=o", "--frames-per-clipp=3"], ["--train=4"]):  # typo; missing --out
    with pytest.raises(SystemExit) as e:
      cli.parse(synthetic.define_flags, argv, "synthetic")
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_stray_positional_argument_exits_2_naming_it(capsys, monkeypatch):
  """Every command takes flags only: `--config foo.py bar` must not start the work."""
  called = []
  monkeypatch.setattr(sys, "argv", ["miles_jax.search", "--verbosity=-1", "stray"])
  with pytest.raises(SystemExit) as e:
    cli.run(lambda argv: called.append(argv))
  assert e.value.code == 2 and not called
  assert "unexpected arguments ['stray']" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_command_with_dashed_flags(tmp_path):
  """The README's dashed spelling still runs (`python -m`), quietly: a csv whose files are
  missing is written as an empty shard with every item reported."""
  ann = tmp_path / "ann.csv"
  ann.write_text("video_path,caption\nnope0.mp4,a clip\nnope1.mp4,another clip\n")
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", "miles_jax.data.prepare", "--format", "csv",
                      f"--annotations={ann}", "--media-dir", str(tmp_path), f"--out={out}",
                      "--num-shards=1", "--workers=1"],
                     cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert os.path.isfile(out / "train-00000-of-00001.tfrecord")
  assert "written 0/2 clips into 1 shards" in r.stdout and "missing file" in r.stdout
  assert not LOG_LINE.search(r.stderr), r.stderr
  r = subprocess.run([sys.executable, "-m", "miles_jax.data.prepare", "--format=csv",
                      f"--annotations={ann}", f"--out={out}"],  # --media_dir missing
                     cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=120)
  assert r.returncode == 2 and "media_dir" in r.stderr, r.stderr[-2000:]


def test_importing_the_package_changes_nothing_in_the_process():
  """`import miles_jax` (and its path layer) installs no import hook and sets no environment
  variable; the commands' cli.setup_process() does both (idempotently)."""
  code = ("import os, sys\n"
          "env, hooks = dict(os.environ), list(sys.meta_path)\n"
          "import miles_jax, miles_jax.paths, miles_jax.console\n"
          "assert dict(os.environ) == env and sys.meta_path == hooks, 'import changed the process'\n"
          "from miles_jax import cli\n"
          "cli.setup_process(); cli.setup_process()\n"
          "hooks = [type(h).__name__ for h in sys.meta_path]\n"
          "assert hooks.count('_QuietTensorFlowImport') == 1, hooks\n"
          "assert os.environ['EPATH_USE_TF'] == 'false' and os.environ['TF_CPP_MIN_LOG_LEVEL'] == '3'\n")
  env = _env()
  env.pop("EPATH_USE_TF", None)
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     env=env, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
