"""Fine-tune a pre-trained model on MSVD: 1,200 train videos, 670 test videos with multiple captions each.

The papers' protocol: contrastive loss only, lr 3e-5 (the released config); the appendix
ablation adds MVM: `--config.objectives=contrastive,miles`.

    python -m miles_jax.train --config=configs/finetune_msvd.py \
        --config.train.init_from=PATH_TO_EXPORT_OR_PTH --workdir=runs/ft_msvd
"""
from miles_jax import config_lib


def get_config(arg: str = ""):
  c = config_lib.default_config()
  c.model = config_lib.model_config("base")
  c.model.dtype = "bfloat16"
  c.objectives = arg or "contrastive"
  c.data.train = "data/msvd/train-*.tfrecord"
  c.data.eval = "data/msvd/test-*.tfrecord"
  c.data.tokenizer = "data/bert-base-uncased/vocab.txt"
  c.data.num_frames = 4
  c.data.max_len = 50
  c.data.batch_size = 64
  c.data.eval_batch_size = 64
  c.optim.lr = 3e-5
  c.optim.warmup_steps = 500
  c.train.steps = 10_000
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.eval_every = 1000
  c.train.best_metric = "retrieval/t2v_R1"
  return c
