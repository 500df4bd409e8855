"""MILES pre-training at the paper's settings: ViT-B/16 + DistilBERT, WebVid-2M + CC3M.

Frozen's curriculum (SPEC): stage 1 trains on 1-frame clips (images and videos), stage 2 on 4
frames starting from stage 1 (the temporal rows for frames 2-4 start at zero):

    python -m miles_jax.train --config=configs/pretrain_miles.py:stage1 --workdir=runs/miles_s1
    python -m miles_jax.train --config=configs/pretrain_miles.py:stage2 --workdir=runs/miles_s2 \
        --config.train.init_from=runs/miles_s1/export

Initialise stage 1 from public weights with `--config.init.video=ViT-B_16.npz
--config.init.text=distilbert-base-uncased/` (see docs/init_viz_profile.md).
Data: `python -m miles_jax.data.prepare --format=webvid ...` and `--format=cc3m ...` write the
shards named below under `data/` (weighted sources: edit the list below for other ratios); a
second config argument moves the root, e.g. `--config=configs/pretrain_miles.py:stage2,gs://b/d`
reads gs://b/d/{webvid,cc3m}/train-*.tfrecord and gs://b/d/bert-base-uncased/vocab.txt (what
launch/tpu_pod.sh does with DATA=...). Batch size, steps and warm-up are not fixed by the paper:
the values here are defaults to verify.
"""
from miles_jax import config_lib


def get_config(arg: str = "stage2"):
  arg, _, root = arg.partition(",")
  root = (root or "data").rstrip("/")
  c = config_lib.default_config()
  c.model = config_lib.model_config("base")
  c.model.dtype = "bfloat16"
  # ViT-B at batch 256: activations, not params, fill the memory. Planned for v5e-64 (4 clips
  # per chip, scanned layers; docs/plan.md): remat "none" needs 17.1 GiB per chip of the 16;
  # "dots_saveable" (keep matmul outputs, recompute the elementwise ops) 8.8 GiB at the same
  # FLOPs as "none"; "full" 4.8 GiB for 22 % more FLOPs. On 32+ GiB chips (v6e, v5p) "none"
  # fits (--config.model.remat=none). "dots_saveable" fits a v5e up to 9 clips per chip (batch
  # 576 on v5e-64, plan --max_batch); "full" beyond that or for longer clips.
  c.model.remat = "dots_saveable"
  c.objectives = "contrastive,miles"
  # The contrastive term on a second, intact forward: the ablation's evidence (3 seeds,
  # docs/results.md: t2v R@1 11.4 ± 1.4 intact vs 5.0 ± 0.7 on the masked clip); costs one more
  # video forward + backward per step.
  c.mvm.unmasked_contrastive = True
  c.data.eval = f"{root}/msrvtt/test-*.tfrecord"
  c.data.tokenizer = f"{root}/bert-base-uncased/vocab.txt"
  c.data.batch_size = 256
  c.data.eval_batch_size = 64
  c.data.max_len = 32
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.05
  c.train.log_every = 50
  c.train.checkpoint_every = 2000
  c.train.eval_every = 5000
  c.train.best_metric = "retrieval/t2v_R10"
  if arg == "stage1":
    c.data.num_frames = 1
    c.train.steps = 100_000
  elif arg in ("stage2", "base", ""):
    c.data.num_frames = 4
    c.train.steps = 50_000
  else:
    raise ValueError(f"configs/pretrain_miles.py:{arg}: use stage1 or stage2")
  # WebVid-2M clips and CC3M images as two sources; each global batch comes from one of them,
  # picked with these weights (docs/data.md). 0.45 / 0.55 is the datasets' size ratio (2.5 M
  # clips, 3.0 M images), what concatenating them (Frozen in Time) gives; change it here.
  # Images stay 1-frame clips in both stages (the step compiles once per frame count); videos
  # use data.num_frames (1 in stage 1, 4 in stage 2).
  config_lib.set_train_sources(c, [
      {"glob": f"{root}/webvid/train-*.tfrecord", "weight": 0.45, "frames": c.data.num_frames},
      {"glob": f"{root}/cc3m/train-*.tfrecord", "weight": 0.55, "frames": 1},
  ])
  c.mesh.shape = (-1, 1)
  c.mesh.axes = ("data", "fsdp")
  return c
