"""The embedded default: synthetic video-text data, a tiny MILES model, CPU, a few minutes.

    python -m miles_jax.data.synthetic --out=workdirs/synthetic
    python -m miles_jax.train --config=configs/demo.py --workdir=workdirs/demo

`bash launch/local.sh` does both (and sets up the environment). The argument picks the data
folder: configs/demo.py:DIR.
"""
import os

from miles_jax import config_lib


def get_config(arg: str = ""):
  data_dir = arg or os.environ.get("MILES_DEMO_DATA", "workdirs/synthetic")
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.model.video.num_frames = 4
  c.model.text.max_len = 16
  # A CPU run: the same model through the XLA:CPU kernels (models/xla_cpu.py); a TPU / GPU run
  # of this config should set model.kernels=reference.
  c.model.kernels = "xla_cpu"
  c.model.low_precision = "matmuls"  # if --set=model.dtype=bfloat16: bf16 matmuls only
  c.objectives = "contrastive,miles"
  # The contrastive term on a second, intact forward: the better placement in the ablation
  # (python -m miles_jax.ablate; README "Results"); on the masked clip MILES trailed
  # contrastive-only training.
  c.mvm.unmasked_contrastive = True
  c.temperature = 0.05
  c.mask.strategy = "blockwise"
  c.mask.ratio = 0.5
  c.snapshot.momentum = 0.99  # short run: a faster-moving snapshot than the paper's 0.999
  c.data.train = os.path.join(data_dir, "train-*.tfrecord")
  c.data.eval = os.path.join(data_dir, "eval-*.tfrecord")
  c.data.tokenizer = os.path.join(data_dir, "vocab.txt")
  c.data.num_frames = 4
  c.data.max_len = 16
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.data.crop_scale = (0.8, 1.0)
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.01
  c.train.steps = 1500
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.eval_every = 500
  c.train.best_metric = "retrieval/t2v_R1"
  # The final table also shows the ablation's contrastive-only row (same 512-clip split).
  c.train.compare_to = "benchmarks/results/ablation.json"
  return c
