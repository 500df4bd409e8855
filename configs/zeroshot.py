"""Zero-shot evaluation: retrieval (MSR-VTT, MSVD, LSMDC, DiDeMo) or action recognition
(HMDB51, UCF101: video->text over class-name prompts, every official split), of a converted or
trained model. The protocol per benchmark is in docs/evaluation.md.

    python -m miles_jax.evaluate --config=configs/zeroshot.py:msrvtt --checkpoint=MILES.pth
    python -m miles_jax.evaluate --config=configs/zeroshot.py:ucf101 --checkpoint=export/
    # options the papers compare with (all off here), e.g.
    #   --config.eval.post=dsl  --config.eval.v2t_multi_caption=max  --config.data.eval_clips=4
"""
from miles_jax import config_lib

RETRIEVAL = ("msrvtt", "msvd", "lsmdc", "didemo")
ACTION = ("hmdb51", "ucf101")


def get_config(arg: str = "msrvtt"):
  c = config_lib.default_config()
  c.model = config_lib.model_config("base")
  c.data.tokenizer = "data/bert-base-uncased/vocab.txt"
  c.data.num_frames = 4
  c.data.eval_batch_size = 32
  c.data.eval_name = arg
  # Captions are not cut to the training length: eval_max_len 0 = the text model's 512
  # positions (Frozen tokenises test text with truncation only at the model's maximum), so
  # DiDeMo paragraphs keep every sentence.
  c.data.eval_max_len = 0
  if arg in RETRIEVAL:
    c.evaluators = "retrieval"
    c.data.eval = f"data/{arg}/test-*.tfrecord"
  elif arg in ACTION:
    c.evaluators = "zeroshot"
    # prepare --fold=all writes test1-*, test2-*, test3-*: the three official splits
    c.data.eval = f"data/{arg}/{{split}}-*.tfrecord"
    c.data.eval_splits = "test1,test2,test3"
  else:
    raise ValueError(f"configs/zeroshot.py:{arg}: use one of {list(RETRIEVAL) + list(ACTION)}")
  return c
