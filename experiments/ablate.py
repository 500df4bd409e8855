r"""The ablation: which parts of MILES help, measured over seeds on the synthetic set.

  python -m experiments.ablate --out=workdirs/ablate [--quick | --smoke] [--only=V1,V2] \
      [--seeds=0,1,2] [--steps=1500] [--report_only]

Trains every variant (a set of config overrides on `configs/demo.py`) once per seed on the
synthetic video-text set (1024 train clips, a held-out split of 512 clips with unique captions;
data seed fixed, so every run sees the same data and the seeds vary the initialisation, batch
order and masks), evaluates held-out text->video / video->text retrieval at the last step, and
writes into --out:

  runs/VARIANT/seedN/     one training workdir per run (results.json marks it finished)
  ablation.md             mean ± std over the seeds of R@1, R@5, R@10, MdR in both directions
  ablation.json           the same, every run's figures, wall times and the overrides
  ablation.png            bars with error bars (std over seeds) and a dashed random-chance line

Resumable: a run whose workdir holds results.json is not retrained, a run that was interrupted
resumes from its last checkpoint, and the grid can be spread over several invocations
(`--only`, `--seeds`); the table always summarises every finished run. Variants whose resolved
overrides are identical (e.g. `mask_blockwise` and `ratio_0.5`) share one set of runs.

`--quick`: the three placements of the contrastive term x 3 seeds. `--smoke`: two variants, a
few steps on a tiny set (the test).
"""
from __future__ import annotations

from miles_jax.cli import setup_process

if __name__ == "__main__":  # before TensorFlow / jaxlib load: the log filter, path settings
  setup_process()

import json
import os
import sys
import time

from absl import flags

from miles_jax import cli, config_lib
from miles_jax.evaluation import retrieval

# Every variant sets all of these, so a run's identity does not depend on configs/demo.py's
# choices for them (which follow this ablation's evidence).
PLACEMENT_MASKED = {"objectives": "contrastive,miles", "mvm.unmasked_contrastive": False}
PLACEMENT_INTACT = {"objectives": "contrastive,miles", "mvm.unmasked_contrastive": True}
FIXED = {"mask.strategy": "blockwise", "mask.ratio": 0.5, "mvm.target_space": "features",
         "mvm.target": "snapshot", "mvm.weight": 1.0, "mvm.start_step": 0}
# The placement the masking / ratio / target rows build on: the better placement of the quick grid.
BASE = {**FIXED, **PLACEMENT_INTACT}

VARIANTS = {
    "contrastive_only": {**FIXED, "objectives": "contrastive", "mvm.unmasked_contrastive": False},
    "miles_masked_clip": {**FIXED, **PLACEMENT_MASKED},
    "miles_intact_clip": {**FIXED, **PLACEMENT_INTACT},
    "mask_blockwise": {**BASE, "mask.strategy": "blockwise"},
    "mask_tube": {**BASE, "mask.strategy": "tube"},
    "mask_random": {**BASE, "mask.strategy": "random"},
    "ratio_0.3": {**BASE, "mask.ratio": 0.3},
    "ratio_0.5": {**BASE, "mask.ratio": 0.5},
    "ratio_0.7": {**BASE, "mask.ratio": 0.7},
    "target_space_features": {**BASE, "mvm.target_space": "features"},
    "target_space_projected": {**BASE, "mvm.target_space": "projected"},
    "target_snapshot": {**BASE, "mvm.target": "snapshot"},
    "target_frozen": {**BASE, "mvm.target": "frozen"},
    # per-patch normalised pixels of the intact clip (tiny model: 8x8x3 values per patch)
    "target_pixels": {**BASE, "mvm.target": "pixels", "model.mvm_head_dim": 8 * 8 * 3},
    "mac": {**FIXED, "objectives": "mac", "mvm.unmasked_contrastive": False},
    # MVM from step 500 (a third of the run): the snapshot's targets once contrastive training
    # has aligned it with the text, as the paper's (pretrained) snapshot is from the start
    "mvm_start_500": {**BASE, "mvm.start_step": 500},
    "mvm_weight_0.3": {**BASE, "mvm.weight": 0.3},
    # the paper's snapshot momentum (the demo's is 0.99): targets lag the online encoder by
    # ~1000 steps instead of ~100
    "snapshot_momentum_0.999": {**BASE, "snapshot.momentum": 0.999},
    # a text-aligned but fixed target: the encoder after 500 contrastive-only steps, frozen from
    # then on (the paper's snapshot starts pretrained; target_frozen's is the random init)
    "target_frozen_at_500": {**BASE, "mvm.target": "frozen", "mvm.start_step": 500},
}
QUICK = ("contrastive_only", "miles_intact_clip", "miles_masked_clip")
SMOKE = ("contrastive_only", "miles_intact_clip")
METRICS = retrieval.TABLE_METRICS
DATA = dict(num_train=1024, num_eval=512, resolution=32, frames=8, seed=0)
SMOKE_DATA = dict(num_train=64, num_eval=24, resolution=32, frames=8, seed=0)
# The smoke run: one block per encoder, a few steps, small batches (checkpoint / eval at the end).
SMOKE_TRAIN = {"model.video.depth": 1, "model.text.depth": 1,
               "data.batch_size": 8, "data.eval_batch_size": 8, "train.steps": 3,
               "train.log_every": 1, "train.eval_every": 3, "train.checkpoint_every": 3,
               "optim.warmup_steps": 1, "data.shuffle_buffer": 64}

FLAGS = flags.FLAGS


def define_flags():
  """The CLI flags (defined only when run as a program)."""
  flags.DEFINE_string("out", None, "Folder for the data, the runs and the table/JSON/PNG.")
  flags.DEFINE_bool("quick", False, "Only the three placements of the contrastive term.")
  flags.DEFINE_bool("smoke", False, "Two variants, a few steps on a tiny data set (tests).")
  flags.DEFINE_list("only", [], "Variants to train (default: all, or --quick's / --smoke's): "
                    + ", ".join(VARIANTS) + ".")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (config.seed).")
  flags.DEFINE_integer("steps", None, "train.steps (default: configs/demo.py's).")
  flags.DEFINE_string("data", None, "Synthetic data folder (default: OUT/data, generated once).")
  flags.DEFINE_integer("num_train", DATA["num_train"], "Training clips of the synthetic set (the "
                       "held-out split stays 512 clips; a folder with other parameters is "
                       "regenerated).")
  flags.DEFINE_integer("distractors", 0, "Static shapes per synthetic clip that the caption does "
                       "not mention (data.synthetic --distractors; a harder set: use its own "
                       "--out and --data).")
  flags.DEFINE_float("caption_noise", 0.0, "Fraction of train captions replaced by a random "
                     "one (data.synthetic --caption_noise; a harder set: use its own --out and "
                     "--data).")
  flags.DEFINE_bool("report_only", False, "Train nothing; summarise the finished runs.")
  flags.DEFINE_multi_string("set", [], "A config override applied to every run, KEY=VALUE "
                            "(repeatable; e.g. --set=model.video.patch_size=4); use a separate "
                            "--out for each setting.")


def run_key(overrides: dict) -> str:
  return json.dumps(sorted(overrides.items()))


def run_dirs(names) -> dict:
  """variant -> the folder name its runs live in (the first variant with the same overrides)."""
  first = {}
  for name, ov in VARIANTS.items():
    first.setdefault(run_key(ov), name)
  return {n: first[run_key(VARIANTS[n])] for n in names}


def demo_config(data_dir: str, overrides: dict, seed: int, extra: dict | None = None):
  config = config_lib.sibling(config_lib.default_config_path(), "demo").get_config(data_dir)
  return config_lib.override(config, {**overrides, **(extra or {}), "seed": seed})


def train_one(config, workdir: str) -> dict:
  """Trains (or resumes) one run in-process; writes WORKDIR/results.json and the curves."""
  from miles_jax.train import loop
  t0 = time.time()
  result = loop.train(config, workdir)
  if result.get("preempted"):
    raise SystemExit(f"{workdir}: preempted; re-run to resume")
  retr = [e for e in result.get("evaluators", []) if e.name == "retrieval"]
  model = {k.split("/", 1)[1]: v for k, v in result["eval"].items() if k.startswith("retrieval/")}
  out = {"step": result["step"], "train": result["train"], "eval": result["eval"],
         "retrieval": model, "chance": retr[0].chance() if retr else None,
         "wall_s": time.time() - t0}
  loop.plot_curves(workdir, out["chance"])
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=2, default=float)
  return out


def collect(out_dir: str, names) -> dict:
  """{variant: {seed: results}} of every finished run under OUT/runs."""
  import numpy as np
  dirs = run_dirs(names)
  table, chance = {}, None
  for name in names:
    root = os.path.join(out_dir, "runs", dirs[name])
    seeds = {}
    if os.path.isdir(root):
      for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, "results.json")
        if d.startswith("seed") and os.path.isfile(path):
          with open(path) as f:
            r = json.load(f)
          seeds[int(d[4:])] = {"metrics": {m: float(r["retrieval"][m]) for m in METRICS},
                               "wall_s": r.get("wall_s"), "step": r["step"]}
          chance = chance or r.get("chance")
    row = {"overrides": VARIANTS[name], "runs": dirs[name], "seeds": seeds, "n": len(seeds)}
    if seeds:
      vals = {m: np.array([s["metrics"][m] for s in seeds.values()]) for m in METRICS}
      row["mean"] = {m: float(v.mean()) for m, v in vals.items()}
      # sample std (ddof=1) over seeds; 0 for a single seed
      row["std"] = {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in vals.items()}
    table[name] = row
  return {"variants": table, "chance": chance}


def format_markdown(summary: dict, title: str) -> str:
  cols = [("t2v_R1", "t2v R@1"), ("t2v_R5", "R@5"), ("t2v_R10", "R@10"), ("t2v_MdR", "MdR"),
          ("v2t_R1", "v2t R@1"), ("v2t_R5", "R@5"), ("v2t_R10", "R@10"), ("v2t_MdR", "MdR")]
  lines = [title, "", "| variant | seeds | " + " | ".join(c for _, c in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
  for name, row in summary["variants"].items():
    if not row["n"]:
      lines.append(f"| {name} | 0 | " + " | ".join("–" for _ in cols) + " |")
      continue
    cells = [f"{row['mean'][m]:.1f} ± {row['std'][m]:.1f}" if row["n"] > 1
             else f"{row['mean'][m]:.1f}" for m, _ in cols]  # one seed: no spread to show
    lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
  ch = summary.get("chance")
  if ch:
    lines.append("| random chance | – | " + " | ".join(f"{ch[m]:.1f}" for m, _ in cols) + " |")
  return "\n".join(lines)


def plot(summary: dict, path: str, title: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  rows = [(n, r) for n, r in summary["variants"].items() if r["n"]]
  if not rows:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.1 * len(rows) + 3), 3.8), sharey=True)
  width = 0.27
  x = np.arange(len(rows))
  for ax, d in zip(axes, ("t2v", "v2t")):
    for i, k in enumerate(("R1", "R5", "R10")):
      m = f"{d}_{k}"
      bars = ax.bar(x + (i - 1) * width, [r["mean"][m] for _, r in rows], width,
                    yerr=[r["std"][m] for _, r in rows], capsize=2, label=f"R@{k[1:]}")
      if summary.get("chance"):
        ax.axhline(summary["chance"][m], color=bars.patches[0].get_facecolor(),
                   linestyle="--", linewidth=0.9)
    ax.plot([], [], "k--", linewidth=0.9, label="random chance")
    ax.set_xticks(x)
    ax.set_xticklabels([n for n, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_title({"t2v": "text → video", "v2t": "video → text"}[d])
    ax.set_ylim(0, 100)
  axes[0].set_ylabel("recall (%), mean ± std over seeds")
  import textwrap
  fig.suptitle(textwrap.fill(title, 80), fontsize=8)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.9), ncol=4, fontsize=7,
             frameon=False)
  fig.tight_layout(rect=(0, 0, 1, 0.84))
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def report(out_dir: str, names, steps, data: dict, sets: dict | None = None) -> dict:
  summary = collect(out_dir, names)
  runs = {(r["runs"], seed): s for r in summary["variants"].values()
          for seed, s in r["seeds"].items()}  # rows sharing runs count them once
  walls = [s["wall_s"] for s in runs.values() if s.get("wall_s")]
  title = (f"Held-out retrieval on {data['num_eval']} synthetic clips ({data['num_train']} "
           f"train clips" + (f", {data['distractors']} distractors" if data.get("distractors")
                             else "")
           + (f", {data['caption_noise']:.0%} of train captions random"
              if data.get("caption_noise") else "") + f", {steps} steps of configs/demo.py"
           + "".join(f", {k}={v}" for k, v in (sets or {}).items()) + "), mean ± std over seeds")
  summary.update(data=data, steps=steps, title=title, set=dict(sets or {}),
                 run_wall_s={"total": sum(walls), "runs": len(walls)})
  md = format_markdown(summary, title)
  with open(os.path.join(out_dir, "ablation.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(out_dir, "ablation.json"), "w") as f:
    json.dump(summary, f, indent=1)
  png = plot(summary, os.path.join(out_dir, "ablation.png"), title)
  print(md)
  print(f"table: {os.path.join(out_dir, 'ablation.md')}  json: "
        f"{os.path.join(out_dir, 'ablation.json')}" + (f"  figure: {png}" if png else ""))
  return summary


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  if not FLAGS.out:
    print("error: --out is required (a folder for the runs and the table)", file=sys.stderr)
    return 2
  names = list(FLAGS.only) or list(SMOKE if FLAGS.smoke else QUICK if FLAGS.quick else VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    print(f"error: --only: unknown variant(s) {', '.join(unknown)}; use {', '.join(VARIANTS)}",
          file=sys.stderr)
    return 2
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    print(f"error: --seeds={','.join(FLAGS.seeds)}: give integers, e.g. --seeds=0,1,2",
          file=sys.stderr)
    return 2
  try:
    sets = config_lib.parse_overrides(FLAGS.set)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from miles_jax.data import synthetic
  try:  # before the re-exec and JAX: a bad data option fails at once
    synthetic.check_options(FLAGS.distractors, FLAGS.caption_noise)
  except ValueError as e:
    print(f"error: --{e}", file=sys.stderr)
    return 2
  import jax
  # Seeds of one variant compile to the same programs: reuse them across runs and invocations.
  jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.out, "jax_cache"))
  from miles_jax.train import loop
  data_params = SMOKE_DATA if FLAGS.smoke else {**DATA, "num_train": FLAGS.num_train}
  if FLAGS.distractors:
    data_params = {**data_params, "distractors": FLAGS.distractors}
  if FLAGS.caption_noise:
    data_params = {**data_params, "caption_noise": FLAGS.caption_noise}
  data_dir = FLAGS.data or os.path.join(FLAGS.out, "data")
  os.makedirs(FLAGS.out, exist_ok=True)
  extra = dict(SMOKE_TRAIN) if FLAGS.smoke else {}
  extra.update(sets)
  if FLAGS.steps:
    extra["train.steps"] = FLAGS.steps
  steps = int(demo_config(data_dir, {}, 0, extra).train.steps)
  if not FLAGS.report_only:
    synthetic.ensure(data_dir, **data_params)
    dirs = run_dirs(names)
    todo = []  # seeds outer: an interrupted grid has every variant at the same number of seeds
    for seed in seeds:
      for name in dict.fromkeys(dirs[n] for n in names):
        todo.append((name, seed))
    t_all, trained = time.time(), 0
    for i, (name, seed) in enumerate(todo):
      workdir = os.path.join(FLAGS.out, "runs", name, f"seed{seed}")
      if os.path.isfile(os.path.join(workdir, "results.json")):
        print(f"[ablate] {i + 1}/{len(todo)} {name} seed {seed}: finished before, skipped",
              flush=True)
        continue
      config = demo_config(data_dir, VARIANTS[name], seed, extra)
      print(f"[ablate] {i + 1}/{len(todo)} {name} seed {seed}: training {steps} steps in "
            f"{workdir}", flush=True)
      code = loop.main_exit_code(lambda: train_one(config, workdir))
      if code:
        return code
      with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
      trained += 1
      print(f"[ablate] {name} seed {seed}: t2v R@1 {res['retrieval']['t2v_R1']:.1f} "
            f"R@10 {res['retrieval']['t2v_R10']:.1f}, wall {res['wall_s']:.0f} s "
            f"(total so far {time.time() - t_all:.0f} s)", flush=True)
    print(f"[ablate] trained {trained} run(s) in {time.time() - t_all:.0f} s", flush=True)
  report(FLAGS.out, names, steps, data_params, sets)
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)
