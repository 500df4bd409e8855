"""Fine-tuning on a retrieval dataset: the papers' protocol (contrastive only, lr 3e-5).

Shared by configs/finetune_{msrvtt,msvd,lsmdc,didemo}.py; each of those picks its dataset.
"""
from miles_jax import config_lib

# dataset -> (what the split is, max caption tokens)
DATASETS = {
    "msrvtt": ("MSR-VTT: train on the 9k train videos, test on the 1k-A (jsfusion) split", 32),
    "msvd": ("MSVD: 1,200 train videos; 670 test videos with multiple captions each", 32),
    "lsmdc": ("LSMDC: 1,000 test clips", 32),
    "didemo": ("DiDeMo: paragraph-to-video (all sentences of a video joined at prepare time)", 64),
}


def finetune_config(dataset: str, objectives: str = ""):
  """`objectives` '' = contrastive (the papers); 'contrastive,miles' = the appendix MVM ablation."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown fine-tuning dataset {dataset!r}: use {sorted(DATASETS)}")
  c = config_lib.default_config()
  c.model = config_lib.model_config("base")
  c.model.dtype = "bfloat16"
  c.objectives = objectives or "contrastive"
  c.data.train = f"data/{dataset}/train-*.tfrecord"
  c.data.eval = f"data/{dataset}/test-*.tfrecord"
  c.data.tokenizer = "data/bert-base-uncased/vocab.txt"
  c.data.num_frames = 4
  c.data.max_len = DATASETS[dataset][1]
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
