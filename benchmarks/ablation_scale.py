r"""MILES against contrastive-only training at a larger scale than the CPU demo (an accelerator).

  python benchmarks/ablation_scale.py --out=DIR [--variants=contrastive_only,miles_intact_clip] \
      [--seeds=0,1,2] [--steps=3000] [--deadline_s=SECONDS] [--smoke]

The CPU ablation (`python -m miles_jax.ablate`) trains configs/demo.py — a width-64, 2-block
model on 1024 clips of 32² frames (16 patches a frame) — and no MILES variant separates from
contrastive-only there. This script asks the same question nearer the paper's regime, sized for
one GPU: the synthetic set at 64² (64 patches a frame, objects spanning several patches),
8192 train clips and a held-out split of 1024 clips with unique captions, the `small` encoders
(width 192, 4 blocks, patch 8), batch 128, 3000 steps. Variants are `miles_jax.ablate.VARIANTS`
(same overrides), seeds vary initialisation, batch order and masks; the data are fixed.

It uses the library's model, train step (`make_train_step`), masks (`masking.sample_masks`,
drawn ahead in worker processes) and retrieval metrics, but feeds clips from memory instead of
tf.data (so it runs where TensorFlow is not installed): train clips take one random frame of
each of 4 equal segments of the 8 stored frames, eval clips the segment centres, no crop (the
demo's pipeline adds a random resized crop, scale 0.8–1). Captions are tokenised with the
synthetic vocabulary (every word is one WordPiece token, as the BERT tokenizer gives).

Writes OUT/runs/VARIANT/seedN/results.json (the layout `miles_jax.ablate` reads: figures at the
last step, the eval curve, wall and step times) as each run finishes, then OUT/ablation_scale.
{md,json,png}. Runs already in OUT are skipped; with `--deadline_s` a run is not started when
the time left is shorter than the longest run so far (so a time-limited job returns whole runs).
`--smoke`: a tiny set and model, a few steps (the test).
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCALE = dict(num_train=8192, num_eval=1024, resolution=64, frames=8, seed=0)
SMOKE_DATA = dict(num_train=48, num_eval=16, resolution=32, frames=8, seed=0)
NUM_FRAMES, MAX_LEN = 4, 16


def scale_config(variant: str, seed: int, steps: int, smoke: bool):
  from miles_jax import ablate, config_lib
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny" if smoke else "small")
  c.model.kernels = "xla_cpu"  # runs on CPU: the CPU kernels (models/xla_cpu.py)
  c.model.video.img_size = SMOKE_DATA["resolution"] if smoke else SCALE["resolution"]
  c.model.video.patch_size = 8
  c.model.video.num_frames = NUM_FRAMES
  if smoke:
    c.model.video.depth = c.model.text.depth = 1
  c.model.text.vocab_size = 64  # the synthetic vocabulary has 34 entries
  c.model.dtype = "float32" if smoke else "bfloat16"
  c.temperature = 0.05
  c.snapshot.momentum = 0.99
  c.data.num_frames, c.data.max_len = NUM_FRAMES, MAX_LEN
  c.data.batch_size = 8 if smoke else 128
  c.optim.lr = 5e-4
  c.optim.warmup_steps = max(1, min(150, steps // 10))
  c.optim.weight_decay = 0.01
  c.train.steps = steps
  return config_lib.override(c, {**ablate.VARIANTS[variant], "seed": seed})


@functools.lru_cache(maxsize=1)
def _vocab() -> dict:
  from miles_jax.data import synthetic
  return {w: i for i, w in enumerate(synthetic.vocabulary())}


def token_ids(caption: str) -> list:
  """[CLS] words [SEP] [PAD]... (MAX_LEN ids): what the BERT WordPiece tokenizer gives with the
  synthetic vocabulary, whose every word is one token (tests/test_ablation_scale.py checks)."""
  vocab = _vocab()
  tok = [vocab["[CLS]"]] + [vocab[w] for w in caption.split()][:MAX_LEN - 2] + [vocab["[SEP]"]]
  return tok + [vocab["[PAD]"]] * (MAX_LEN - len(tok))


def make_data(params: dict):
  """(train frames uint8 [N, 8, S, S, 3], train ids int32 [N, L], eval frames, eval ids)."""
  from miles_jax.data import synthetic

  def split(num, seed, unique):
    frames, ids = [], []
    for _, cap, clip in synthetic.examples(num, seed, params["resolution"], params["frames"],
                                           unique=unique):
      ids.append(token_ids(cap))
      frames.append(clip)
    return np.stack(frames), np.asarray(ids, np.int32)

  s = params["seed"]  # the synthetic generator's split seeds
  return (*split(params["num_train"], s * 2, False), *split(params["num_eval"], s * 2 + 1, True))


def _masks_for_step(args):
  from miles_jax import masking
  seed, step, b, strategy, grid, ratio = args
  return masking.sample_masks((seed, step), range(b), strategy, NUM_FRAMES, grid, ratio)


def _segments(num_stored: int):
  """(start, end) of T equal segments of the stored frames, as data/pipeline.py cuts them."""
  t = np.arange(NUM_FRAMES)
  starts = (t * num_stored) // NUM_FRAMES
  return starts, np.maximum(((t + 1) * num_stored) // NUM_FRAMES, starts + 1)


def _centres(num_stored: int):
  """The eval frames: the middle of each equal segment (data/pipeline.py `frame_indices`)."""
  t = np.arange(NUM_FRAMES)
  return np.minimum(((2 * t + 1) * num_stored) // (2 * NUM_FRAMES), num_stored - 1)


def make_retrieval(config, batch: int = 256):
  """`(params, frames uint8 [N, K, S, S, 3], ids [N, L]) -> metrics` for one model config: its
  two embedding functions are compiled once and reused at every evaluation of a run."""
  import jax
  from miles_jax.evaluation import retrieval as R
  from miles_jax.models import dual_encoder
  from miles_jax.train.step import normalize_frames
  model = dual_encoder.build(config.model)
  vid = jax.jit(lambda p, f: model.apply({"params": p}, normalize_frames(f),
                                         method=model.encode_video)["embed"])
  txt = jax.jit(lambda p, i: model.apply({"params": p}, i, (i > 0).astype(np.int32),
                                         method=model.encode_text)["embed"])

  def run(params, frames, ids) -> dict:
    centre = _centres(frames.shape[1])
    v = np.concatenate([np.asarray(vid(params, frames[i:i + batch][:, centre]))
                        for i in range(0, len(frames), batch)])
    t = np.concatenate([np.asarray(txt(params, ids[i:i + batch]))
                        for i in range(0, len(ids), batch)])
    return R.retrieval_metrics(R.cosine_similarity(t, v), np.arange(len(t)))

  return run


def train_run(variant, seed, steps, data, out_dir, smoke, eval_every, pool) -> dict:
  import jax
  from miles_jax import parallel
  from miles_jax.train.state import create_train_state
  from miles_jax.train.step import make_train_step, batch_keys
  tr_f, tr_i, ev_f, ev_i = data
  config = scale_config(variant, seed, steps, smoke)
  mesh = parallel.mesh_from_config(config)
  rules = parallel.logical_rules(config.sharding.rules, mesh)
  t0 = time.time()
  state = create_train_state(config, jax.random.PRNGKey(seed), mesh)
  step_fn = make_train_step(config, mesh)
  retrieval = make_retrieval(config)
  keys = batch_keys(config)
  b = int(config.data.batch_size)
  grid = (config.model.video.img_size // config.model.video.patch_size,) * 2
  mvm = "mvm_mask" in keys
  masks = (pool.imap(_masks_for_step, ((seed, s, b, config.mask.strategy, grid,
                                       float(config.mask.ratio)) for s in range(steps)),
                     chunksize=8) if mvm else None)
  rng = np.random.default_rng([seed, 1])
  starts, ends = _segments(tr_f.shape[1])
  order, pos = rng.permutation(len(tr_f)), 0
  curve, losses, t_first = [], [], None
  for step in range(steps):
    if pos + b > len(order):
      order, pos = rng.permutation(len(tr_f)), 0
    rows = order[pos:pos + b]
    pos += b
    frame_idx = starts[None] + (rng.random((b, NUM_FRAMES)) * (ends - starts)[None]).astype(int)
    batch = {"frames": tr_f[rows[:, None], frame_idx], "input_ids": tr_i[rows],
             "attention_mask": (tr_i[rows] > 0).astype(np.int32)}
    if mvm:
      batch["mvm_mask"] = next(masks)
    state, metrics = step_fn(state, parallel.global_batch(batch, mesh, rules))
    if step == 0:
      jax.block_until_ready(state)
      t_first = time.time()
    if (step + 1) % 100 == 0 or step + 1 == steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      losses.append({"step": step + 1, **m})
      print(f"[{variant} seed {seed}] step {step + 1}: loss {m['loss']:.3f} contrastive "
            f"{m['contrastive_loss']:.3f} mvm {m['mvm_loss']:.3f}", flush=True)
    if (step + 1) % eval_every == 0 or step + 1 == steps:
      r = retrieval(state.params, ev_f, ev_i)
      curve.append({"step": step + 1, **r})
      print(f"[{variant} seed {seed}] step {step + 1}: held-out t2v R@1 {r['t2v_R1']:.1f} "
            f"R@10 {r['t2v_R10']:.1f}", flush=True)
  jax.block_until_ready(state)
  t_end = time.time()
  from miles_jax.evaluation import retrieval as R
  train_sub = retrieval(state.params, tr_f[:len(ev_f)], tr_i[:len(ev_f)])
  result = {"step": steps, "retrieval": {k: v for k, v in curve[-1].items() if k != "step"},
            "curve": curve, "train_losses": losses,
            "train_subset_retrieval": train_sub,  # first clips of the train split (captions repeat)
            "chance": R.chance_metrics(len(ev_f), len(ev_f)),
            "wall_s": t_end - t0, "step_s": (t_end - t_first) / max(steps - 1, 1),
            "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
            "jax": jax.__version__, "variant": variant, "seed": seed, "smoke": smoke}
  run_dir = os.path.join(out_dir, "runs", variant, f"seed{seed}")
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump(result, f, indent=1, default=float)
  print(f"[{variant} seed {seed}] done in {result['wall_s']:.0f} s "
        f"({result['step_s'] * 1e3:.1f} ms/step)", flush=True)
  return result


def summarise(out_dir: str, variants, data_params: dict, steps: int, smoke: bool) -> dict:
  from miles_jax import ablate
  summary = ablate.collect(out_dir, variants)
  title = (f"Held-out retrieval on {data_params['num_eval']} synthetic clips "
           f"({data_params['num_train']} train clips, {data_params['resolution']}² frames, "
           f"{'tiny' if smoke else 'small'} encoders, patch 8, {steps} steps of batch "
           f"{8 if smoke else 128}), mean ± std over seeds")
  runs = {}  # the eval curve, step time and machine of every finished run
  for v in variants:
    for seed in summary["variants"][v]["seeds"]:
      with open(os.path.join(out_dir, "runs", v, f"seed{seed}", "results.json")) as f:
        r = json.load(f)
      runs[f"{v}/seed{seed}"] = {
          "t2v_R1_curve": {c["step"]: c["t2v_R1"] for c in r["curve"]},
          "train_subset_t2v_R1": r["train_subset_retrieval"]["t2v_R1"],
          "final_train_losses": r["train_losses"][-1], "step_s": r["step_s"],
          "device": r["device"], "jax": r["jax"]}
  summary.update(data=data_params, steps=steps, title=title, runs=runs)
  md = ablate.format_markdown(summary, title)
  base = os.path.join(out_dir, "ablation_scale")
  with open(base + ".md", "w") as f:
    f.write(md + "\n")
  with open(base + ".json", "w") as f:
    json.dump(summary, f, indent=1)
  ablate.plot(summary, base + ".png", title)
  print(md, flush=True)
  return summary


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--variants", default="contrastive_only,miles_intact_clip")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=None, help="default 3000 (smoke: 4)")
  p.add_argument("--eval_every", type=int, default=1000)
  p.add_argument("--deadline_s", type=float, default=None,
                 help="start no run that would end after this many seconds from the start")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--copy_to", default=None,
                 help="also keep every run's results.json of this invocation in this one JSON "
                      "file ({VARIANT/seedN: results}), rewritten after each run")
  p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
  args = p.parse_args(argv)
  from miles_jax import ablate
  variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in variants if v not in ablate.VARIANTS]
  if unknown:
    print(f"--variants: unknown {unknown}; choose from {sorted(ablate.VARIANTS)}", file=sys.stderr)
    return 2
  seeds = [int(s) for s in args.seeds.split(",") if s]
  steps = args.steps or (4 if args.smoke else 3000)
  params = SMOKE_DATA if args.smoke else SCALE
  t0 = time.time()
  data = make_data(params)
  print(f"data: {len(data[0])} train + {len(data[2])} eval clips {data[0].shape[1:]} in "
        f"{time.time() - t0:.1f} s", flush=True)
  longest, done = 0.0, {}
  with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
    for seed in seeds:  # seed-major: every variant gets seed 0 before any gets seed 1
      for v in variants:
        if os.path.isfile(os.path.join(args.out, "runs", v, f"seed{seed}", "results.json")):
          continue
        if args.deadline_s and time.time() - t0 + longest > args.deadline_s:
          print(f"deadline: not starting {v} seed {seed}", flush=True)
          continue
        r = train_run(v, seed, steps, data, args.out, args.smoke,
                      min(args.eval_every, steps), pool)
        longest = max(longest, r["wall_s"])
        if args.copy_to:
          done[f"{v}/seed{seed}"] = r
          with open(args.copy_to, "w") as f:
            json.dump(done, f, default=float)
  summarise(args.out, variants, params, steps, args.smoke)
  return 0


if __name__ == "__main__":
  sys.exit(main())
