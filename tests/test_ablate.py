"""The ablation runner: variant bookkeeping, the mean ± std summary, and a smoke run of the CLI
(two variants, three steps on a tiny synthetic set) that also checks resuming skips finished runs.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import ablate
from miles_jax.evaluation import retrieval
from miles_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_rows_and_shared_runs():
  """Every row the grid needs exists, every variant pins the fields a run's identity depends on,
  and rows with identical settings share one set of runs (and only those)."""
  need = {"contrastive_only", "miles_masked_clip", "miles_intact_clip", "mask_blockwise",
          "mask_tube", "mask_random", "ratio_0.3", "ratio_0.5", "ratio_0.7",
          "target_space_features", "target_space_projected", "target_snapshot", "target_frozen",
          "target_pixels", "mac"}
  assert need <= set(ablate.VARIANTS)
  for name, ov in ablate.VARIANTS.items():
    assert set(ablate.FIXED) | {"objectives", "mvm.unmasked_contrastive"} <= set(ov), name
  dirs = ablate.run_dirs(list(ablate.VARIANTS))
  base = dirs["mask_blockwise"]
  assert base in ("miles_masked_clip", "miles_intact_clip")
  for name in ("ratio_0.5", "target_space_features", "target_snapshot"):
    assert dirs[name] == base, name
  for name in need - {"mask_blockwise", "ratio_0.5", "target_space_features", "target_snapshot",
                      base}:
    assert dirs[name] == name, name
  assert ablate.VARIANTS["target_frozen"]["mvm.target"] == "frozen"
  assert ablate.VARIANTS["miles_intact_clip"]["mvm.unmasked_contrastive"] is True
  assert ablate.VARIANTS["miles_masked_clip"]["mvm.unmasked_contrastive"] is False


def _fake_run(out, name, seed, t2v_r1, wall):
  d = os.path.join(out, "runs", name, f"seed{seed}")
  os.makedirs(d)
  metrics = {m: float(t2v_r1 + i) for i, m in enumerate(ablate.METRICS)}
  with open(os.path.join(d, "results.json"), "w") as f:
    json.dump({"step": 10, "retrieval": metrics, "wall_s": wall,
               "chance": {m: 0.5 for m in ablate.METRICS}}, f)


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
  out = str(tmp_path)
  for seed, r1 in enumerate((10.0, 20.0, 30.0)):
    _fake_run(out, "contrastive_only", seed, r1, wall=5.0)
  _fake_run(out, "miles_intact_clip", 4, 40.0, wall=7.0)
  os.makedirs(os.path.join(out, "runs", "miles_masked_clip", "seed0"))  # unfinished: no results
  names = ["contrastive_only", "miles_masked_clip", "miles_intact_clip", "ratio_0.5"]
  s = ablate.report(out, names, 10, ablate.SMOKE_DATA)
  row = s["variants"]["contrastive_only"]
  assert row["n"] == 3 and sorted(row["seeds"]) == [0, 1, 2]
  assert row["mean"]["t2v_R1"] == pytest.approx(20.0)
  assert row["std"]["t2v_R1"] == pytest.approx(10.0)  # ddof=1: sqrt(200/2)
  assert row["mean"]["v2t_MdR"] == pytest.approx(28.0)
  assert s["variants"]["miles_masked_clip"]["n"] == 0
  intact = s["variants"]["miles_intact_clip"]
  assert intact["n"] == 1 and intact["std"]["t2v_R1"] == 0.0
  assert s["variants"]["ratio_0.5"]["runs"] == ablate.run_dirs(["ratio_0.5"])["ratio_0.5"]
  assert s["run_wall_s"] == {"total": 22.0, "runs": 4}
  md = open(os.path.join(out, "ablation.md")).read()
  assert "| contrastive_only | 3 | 20.0 ± 10.0 | 21.0 ± 10.0 | 22.0 ± 10.0 | 23.0 ± 10.0 | " \
      "25.0 ± 10.0 |" in md  # MnR (24) is in the JSON, not the table
  assert "| miles_masked_clip | 0 |" in md and "random chance" in md
  assert "| miles_intact_clip | 1 | 40.0 | 41.0 |" in md  # one seed: no ± shown
  with open(os.path.join(out, "ablation.json")) as f:
    assert json.load(f)["variants"]["contrastive_only"]["mean"]["t2v_R1"] == pytest.approx(20.0)
  with open(os.path.join(out, "ablation.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The demo's final table quotes the contrastive-only row, only for the same held-out split.
  ref = retrieval.reference_rows(os.path.join(out, "ablation.json"), ablate.SMOKE_DATA["num_eval"])
  assert list(ref) == ["contrastive_only (ablation, mean of 3 seeds)"]
  assert ref["contrastive_only (ablation, mean of 3 seeds)"]["t2v_MnR"] == pytest.approx(24.0)
  assert retrieval.reference_rows(os.path.join(out, "ablation.json"), 128) == {}
  assert retrieval.reference_rows(os.path.join(out, "missing.json"), 24) == {}


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "experiments.ablate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def test_bad_variant_is_exit_2(tmp_path):
  r = _cli(f"--out={tmp_path}", "--only=contrastive_only,nope")
  assert r.returncode == 2 and "nope" in r.stderr and "miles_intact_clip" in r.stderr
  r = _cli(f"--out={tmp_path}", "--smoke", "--set=optim.lr")
  assert r.returncode == 2 and "--set 'optim.lr'" in r.stderr and "KEY=VALUE" in r.stderr
  r = _cli(f"--out={tmp_path}", "--smoke", "--caption_noise=1.5")
  assert r.returncode == 2 and "--caption_noise=1.5" in r.stderr and "[0, 1)" in r.stderr


def test_parse_overrides_literals_and_strings():
  got = config_lib.parse_overrides(["optim.lr=0.002", "mask.strategy=tube",
                                    "model.video.patch_size=4", "data.crop_scale=(0.5, 1.0)"])
  assert got == {"optim.lr": 0.002, "mask.strategy": "tube", "model.video.patch_size": 4,
                 "data.crop_scale": (0.5, 1.0)}


@pytest.mark.slow
def test_smoke_trains_two_variants_and_resumes(tmp_path):
  out = str(tmp_path / "abl")
  r = _cli(f"--out={out}", "--smoke", "--seeds=0", "--set=optim.lr=0.002")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  with open(os.path.join(out, "ablation.json")) as f:
    s = json.load(f)
  assert list(s["variants"]) == list(ablate.SMOKE)
  for name in ablate.SMOKE:
    row = s["variants"][name]
    assert row["n"] == 1, name
    vals = np.array([row["mean"][m] for m in ablate.METRICS])
    assert np.isfinite(vals).all() and (vals >= 0).all()
    assert 0 <= row["mean"]["t2v_R1"] <= row["mean"]["t2v_R5"] <= row["mean"]["t2v_R10"] <= 100
    res = os.path.join(out, "runs", name, "seed0", "results.json")
    with open(res) as f:
      got = json.load(f)
    assert got["step"] == ablate.SMOKE_TRAIN["train.steps"]
    assert int(got["retrieval"]["num_texts"]) == ablate.SMOKE_DATA["num_eval"]
  miles = os.path.join(out, "runs", "miles_intact_clip", "seed0")
  with open(os.path.join(miles, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["objectives"] == "contrastive,miles" and cfg["mvm"]["unmasked_contrastive"] is True
  assert cfg["optim"]["lr"] == 0.002  # --set reaches every run
  assert s["set"] == {"optim.lr": 0.002} and "optim.lr=0.002" in s["title"]
  assert s["chance"]["t2v_R1"] == pytest.approx(100 / ablate.SMOKE_DATA["num_eval"])
  assert os.path.isfile(os.path.join(out, "ablation.png"))
  assert "wall" in r.stdout and "[ablate] trained 2 run(s)" in r.stdout

  stamp = os.path.getmtime(os.path.join(miles, "results.json"))
  r = _cli(f"--out={out}", "--smoke", "--seeds=0", "--set=optim.lr=0.002")
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("finished before, skipped") == 2
  assert "[ablate] trained 0 run(s)" in r.stdout
  assert os.path.getmtime(os.path.join(miles, "results.json")) == stamp
