"""Zero-shot evaluation: retrieval (MSR-VTT, MSVD, LSMDC, DiDeMo) or action recognition
(HMDB51, UCF101: video->text over class-name prompts), of a converted or trained model.

    python -m miles_jax.evaluate --config=configs/zeroshot.py:msrvtt --checkpoint=miles.pth
    python -m miles_jax.evaluate --config=configs/zeroshot.py:ucf101 --checkpoint=export/ \
        --config.data.eval='data/ucf101/test1-*.tfrecord'
"""
from miles_jax import config_lib

RETRIEVAL = {"msrvtt": 32, "msvd": 32, "lsmdc": 32, "didemo": 64}
ACTION = ("hmdb51", "ucf101")


def get_config(arg: str = "msrvtt"):
  c = config_lib.default_config()
  c.model = config_lib.model_config("base")
  c.data.tokenizer = "data/bert-base-uncased/vocab.txt"
  c.data.num_frames = 4
  c.data.eval_batch_size = 32
  if arg in RETRIEVAL:
    c.evaluators = "retrieval"
    c.data.max_len = RETRIEVAL[arg]
  elif arg in ACTION:
    c.evaluators = "zeroshot"
  else:
    raise ValueError(f"configs/zeroshot.py:{arg}: use one of {sorted(RETRIEVAL) + list(ACTION)}")
  c.data.eval = f"data/{arg}/test-*.tfrecord"
  return c
