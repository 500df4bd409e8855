"""synthetic.py: the demo dataset renders what its captions say and feeds the pipeline."""
import json
import os

import numpy as np

from miles_jax import config_lib
from miles_jax.data import pipeline, schema, synthetic, tokenizers


def _centroid(frame, color):
  ys, xs = np.nonzero((frame == np.array(synthetic.COLORS[color], np.uint8)).all(-1))
  return (xs.mean(), ys.mean(), len(xs)) if len(xs) else (None, None, 0)


def test_render_follows_caption():
  rng = np.random.default_rng(0)
  clip = synthetic.render_clip(rng, 32, 8, [("red", "square", "moves right"),
                                            ("blue", "circle", "appears")])
  xs = [_centroid(f, "red")[0] for f in clip]
  assert xs[3] > xs[0] + 8 and xs[7] == xs[3]  # moves in the first half, then stays
  blue = [_centroid(f, "blue")[2] for f in clip]
  assert blue[:5] == [0] * 5 and min(blue[6:]) > 0  # appears in the second half
  clip = synthetic.render_clip(rng, 32, 8, [("green", "triangle", "shrinks")])
  areas = [_centroid(f, "green")[2] for f in clip]
  assert areas[0] > 2 * areas[-1] and areas == sorted(areas, reverse=True)


def test_generate_and_read(tmp_path):
  out = str(tmp_path / "syn")
  paths = synthetic.generate(out, num_train=24, num_eval=10, resolution=32, frames=4,
                             verbose=False)
  assert sorted(f for f in os.listdir(out) if f.endswith(".tfrecord")) == [
      "eval-00000-of-00002.tfrecord", "eval-00001-of-00002.tfrecord"] + [
      f"train-0000{i}-of-00004.tfrecord" for i in range(4)]
  rec = schema.read_records(os.path.join(out, "train-00000-of-00004.tfrecord"))[0]
  assert rec["num_frames"] == 4 and (rec["height"], rec["width"]) == (32, 32)
  tok = tokenizers.build_tokenizer(paths["tokenizer"], 32)
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.data.train, c.data.eval, c.data.tokenizer = paths["train"], paths["eval"], paths["tokenizer"]
  c.data.batch_size = 8
  ev = pipeline.load_eval_set(paths["eval"], c, tok)
  assert len(ev.video_ids) == 10 and len(set(ev.texts)) == 10  # held-out captions are unique
  assert ev.clips.shape == (10, 4, 32, 32, 3)
  # closed vocabulary: every word is one token, never [UNK] (id 1)
  assert not (ev.input_ids == 1).any()
  words = ev.attention_mask.sum(1) - 2
  assert words.tolist() == [len(t.split()) for t in ev.texts]
  b = next(pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1,
                                        tokenizer=tok))
  assert b["frames"].shape == (8, 4, 32, 32, 3)
  # deterministic generation
  again = synthetic.generate(str(tmp_path / "again"), num_train=24, num_eval=10, resolution=32,
                             frames=4, verbose=False)
  assert open(os.path.join(out, "train-00002-of-00004.tfrecord"), "rb").read() == open(
      again["train"].replace("*", "00002-of-00004"), "rb").read()


def test_distractors_are_static_unmentioned_shapes(tmp_path, monkeypatch):
  """--distractors=N: N shapes that are there from the first frame and never change, none with
  the (colour, shape) of an acting object; without the option the set is what it was."""
  bright = lambda f: (f > 45).any(-1)  # the background noise is 10..39 in every channel
  parts = [("red", "square", "appears")]  # invisible in the first half
  assert not bright(synthetic.render_clip(np.random.default_rng(5), 32, 8, parts)[0]).any()
  for seed in range(20):
    clip = synthetic.render_clip(np.random.default_rng(seed), 32, 8, parts, distractors=2)
    assert bright(clip[0]).any()  # only the distractors are visible at t=0
    assert (clip[:4] == clip[0]).all()  # and they stay still while the actor is away
  drawn = []  # every object render_clip makes: (colour, shape, event)
  orig = synthetic._Object.__init__
  monkeypatch.setattr(synthetic._Object, "__init__", lambda self, rng, size, *p: (
      drawn.append(p), orig(self, rng, size, *p))[1])
  for seed in range(50):
    rng = np.random.default_rng(seed)
    parts = synthetic.sample_parts(rng)
    drawn.clear()
    synthetic.render_clip(rng, 32, 8, parts, distractors=3)
    still = [d[:2] for d in drawn if d[2] == "stays"]
    assert len(still) == 3 and not {p[:2] for p in parts} & set(still)
  monkeypatch.undo()
  out = str(tmp_path / "d")
  synthetic.generate(out, num_train=8, num_eval=4, frames=4, distractors=1, verbose=False)
  with open(os.path.join(out, "synthetic.json")) as f:
    assert json.load(f)["distractors"] == 1
  # ensure() regenerates for other parameters and accepts a folder written before the option
  with open(os.path.join(out, "synthetic.json"), "w") as f:
    json.dump(dict(num_train=8, num_eval=4, resolution=32, frames=4, seed=0, fps=8.0), f)
  stamp = os.path.getmtime(os.path.join(out, "vocab.txt"))
  synthetic.ensure(out, num_train=8, num_eval=4, frames=4)
  assert os.path.getmtime(os.path.join(out, "vocab.txt")) == stamp
  assert synthetic.main(["--out", str(tmp_path / "bad"), "--distractors=-1"]) == 2


def test_caption_noise_replaces_train_captions_only(tmp_path):
  """--caption_noise=P: about P of the train captions are replaced by a random one; the clips
  and the held-out split are what they are without the option."""
  clean = list(synthetic.examples(400, 0, 32, 8))
  noisy = list(synthetic.examples(400, 0, 32, 8, caption_noise=0.5))
  assert all((a[2] == b[2]).all() and a[0] == b[0] for a, b in zip(clean, noisy))
  changed = sum(a[1] != b[1] for a, b in zip(clean, noisy))
  assert 150 <= changed <= 250  # ~200; a replacement can draw the true caption again (rare)
  words = set(synthetic.vocabulary())
  assert all(set(c.split()) <= words for _, c, _ in noisy)  # a replacement is a caption too
  out = str(tmp_path / "n")
  synthetic.generate(out, num_train=16, num_eval=8, frames=4, caption_noise=0.5, verbose=False)
  ref = str(tmp_path / "c")
  synthetic.generate(ref, num_train=16, num_eval=8, frames=4, verbose=False)
  with open(os.path.join(out, "synthetic.json")) as f:
    assert json.load(f)["caption_noise"] == 0.5
  for s in range(synthetic.EVAL_SHARDS):  # the held-out split is clean
    name = f"eval-{s:05d}-of-{synthetic.EVAL_SHARDS:05d}.tfrecord"
    assert open(os.path.join(out, name), "rb").read() == open(os.path.join(ref, name),
                                                               "rb").read()
  assert open(os.path.join(out, "train-00000-of-00004.tfrecord"), "rb").read() != open(
      os.path.join(ref, "train-00000-of-00004.tfrecord"), "rb").read()
  stamp = os.path.getmtime(os.path.join(out, "vocab.txt"))
  synthetic.ensure(out, num_train=16, num_eval=8, frames=4, caption_noise=0.5)  # same: kept
  assert os.path.getmtime(os.path.join(out, "vocab.txt")) == stamp
  assert synthetic.main(["--out", str(tmp_path / "bad"), "--caption_noise=1.0"]) == 2
