"""Zero-shot classification: label normalisation, prompt ensembling, hand-computed accuracy."""
import numpy as np
import pytest

from miles_jax.evaluation import zeroshot


@pytest.mark.parametrize("raw,want", [
    ("ApplyEyeMakeup", "apply eye makeup"),   # UCF101
    ("YoYo", "yo yo"),
    ("HandstandPushups", "handstand pushups"),
    ("PlayingTV", "playing tv"),
    ("brush_hair", "brush hair"),             # HMDB51
    ("sword_exercise", "sword exercise"),
    ("air drumming", "air drumming"),         # Kinetics
    ("passing American football (in game)", "passing american football (in game)"),
    ("  pull-ups ", "pull ups"),
])
def test_normalize_label(raw, want):
  assert zeroshot.normalize_label(raw) == want


def _table_encoder(table, seen=None):
  """encode_text stand-in: looks each prompt up in a dict of vectors."""
  def encode(texts):
    if seen is not None:
      seen.extend(texts)
    return np.stack([table[t] for t in texts])
  return encode


def test_class_embeddings_prompt_ensemble():
  templates = ("{}", "a person is {}.")
  table = {"brush hair": np.array([2.0, 0.0]), "a person is brush hair.": np.array([0.0, 1.0]),
           "ride bike": np.array([1.0, 1.0]), "a person is ride bike.": np.array([3.0, 3.0])}
  seen = []
  emb = zeroshot.class_embeddings(["brush_hair", "ride_bike"], _table_encoder(table, seen),
                                  templates)
  assert seen == ["brush hair", "a person is brush hair.", "ride bike", "a person is ride bike."]
  # mean: unit vectors averaged, then re-normalised.
  np.testing.assert_allclose(emb, np.full((2, 2), 2 ** -0.5), rtol=1e-6)
  raw = zeroshot.class_embeddings(["brush_hair", "ride_bike"], _table_encoder(table), templates,
                                  reduce="mean_raw")
  np.testing.assert_allclose(raw[0], np.array([1.0, 0.5]) / np.hypot(1.0, 0.5), rtol=1e-6)
  with pytest.raises(ValueError, match="encode_text returned"):
    zeroshot.class_embeddings(["a"], lambda t: np.zeros((3, 2)), templates)


def test_accuracy_by_hand():
  class_emb = np.eye(3)
  videos = np.array([[1.0, 0.2, 0.0],    # label 0: top-1 right
                     [0.9, 0.5, 0.0],    # label 1: 2nd
                     [0.1, 0.9, 0.5],    # label 2: 2nd
                     [0.0, 0.0, 1.0]])   # label 0: 2nd/3rd tied -> 0-based rank 1.5
  acc = zeroshot.zeroshot_accuracy(videos, class_emb, [0, 1, 2, 0], topk=(1, 2, 5))
  # 1.5 < 2 counts for top-2, as the original's `cols < K` does for R@K.
  assert acc == pytest.approx({"top1": 25.0, "top2": 100.0, "top5": 100.0})
  # A video tied between its class and another is not a top-1 hit (averaged ties).
  assert zeroshot.zeroshot_accuracy(np.array([[1.0, 1.0]]), np.eye(2), [0])["top1"] == 0


def test_classify_end_to_end_and_splits():
  names = ["ApplyEyeMakeup", "YoYo"]
  vec = {"apply eye makeup": [1.0, 0.0], "yo yo": [0.0, 1.0]}
  encode = lambda texts: np.array([vec[t.split(" of ")[-1].rstrip(".")] for t in texts])
  acc = zeroshot.zeroshot_classify(np.array([[0.9, 0.1], [0.8, 0.3]]), [0, 1], names, encode,
                                   templates=("{}", "a video of {}."), topk=(1,))
  assert acc == {"top1": 50.0}
  out = zeroshot.mean_over_splits({"split1": 50.0, "split2": 60.0, "split3": 70.0})
  assert out["mean"] == pytest.approx(60.0) and out["split2"] == 60.0
  out = zeroshot.mean_over_splits({s: {"top1": v, "top5": 90.0} for s, v in
                                   [("1", 40.0), ("2", 50.0), ("3", 60.0)]})
  assert out["mean"] == pytest.approx({"top1": 50.0, "top5": 90.0})
  with pytest.raises(ValueError, match="expected_splits"):
    zeroshot.mean_over_splits({"split1": 50.0})
  assert zeroshot.mean_over_splits({"split1": 50.0}, expected_splits=None)["mean"] == 50.0
