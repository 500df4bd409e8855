"""experiments/ablation_scale.py: its in-memory input matches the library's pipeline, its smoke
grid writes the layout `experiments.ablate` reads, and finished runs are not retrained."""
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import ablation_scale  # noqa: E402


def test_token_ids_match_the_wordpiece_tokenizer(tmp_path):
  from miles_jax.data import synthetic, tokenizers
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(synthetic.vocabulary()) + "\n")
  tok = tokenizers.WordPieceTokenizer(str(vocab), max_len=ablation_scale.MAX_LEN)
  caps = [c for _, c, _ in synthetic.examples(40, 3, 32, 8)]
  assert any(" then " in c for c in caps) and any(" then " not in c for c in caps)
  ids, mask = tok.tokenize_numpy(caps)
  mine = np.asarray([ablation_scale.token_ids(c) for c in caps])
  np.testing.assert_array_equal(mine, ids)
  np.testing.assert_array_equal((mine > 0).astype(mask.dtype), mask)  # [PAD] is id 0


def test_frames_match_the_pipeline_segments():
  import tensorflow as tf
  from miles_jax.data import pipeline
  for n in (8, 7, 5):
    starts, ends = ablation_scale._segments(n)
    want = pipeline.frame_indices(tf.constant(n), ablation_scale.NUM_FRAMES, train=False).numpy()
    np.testing.assert_array_equal(ablation_scale._centres(n), want)
    for seed in range(5):  # every train draw lies in the pipeline's segment of that frame
      got = pipeline.frame_indices(tf.constant(n), ablation_scale.NUM_FRAMES, train=True,
                                   seed=(seed, 1)).numpy()
      assert np.all((got >= starts) & (got < ends))


@pytest.mark.slow
def test_smoke_grid_and_resume(tmp_path, capsys):
  out = str(tmp_path / "out")
  argv = [f"--out={out}", "--smoke", "--seeds=0", "--workers=1"]
  assert ablation_scale.main(argv) == 0
  for v in ("contrastive_only", "miles_intact_clip"):
    r = json.load(open(os.path.join(out, "runs", v, "seed0", "results.json")))
    assert r["step"] == 4 and r["curve"][-1]["step"] == 4
    assert (r["train_losses"][-1]["mvm_loss"] > 0) == (v == "miles_intact_clip")
  summary = json.load(open(os.path.join(out, "ablation_scale.json")))
  assert {k: row["n"] for k, row in summary["variants"].items()} == {
      "contrastive_only": 1, "miles_intact_clip": 1}
  assert set(summary["runs"]) == {"contrastive_only/seed0", "miles_intact_clip/seed0"}
  assert os.path.isfile(os.path.join(out, "ablation_scale.png"))
  md = open(os.path.join(out, "ablation_scale.md")).read()
  assert "| contrastive_only | 1 |" in md and "| random chance |" in md
  stamp = os.path.getmtime(os.path.join(out, "runs", "contrastive_only", "seed0", "results.json"))
  capsys.readouterr()
  assert ablation_scale.main(argv) == 0  # finished runs are read, not retrained
  assert "done in" not in capsys.readouterr().out
  assert os.path.getmtime(
      os.path.join(out, "runs", "contrastive_only", "seed0", "results.json")) == stamp


def test_unknown_variant_exits_2(tmp_path, capsys):
  assert ablation_scale.main([f"--out={tmp_path}", "--smoke", "--variants=nope"]) == 2
  assert "nope" in capsys.readouterr().err
