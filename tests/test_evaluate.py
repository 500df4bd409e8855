"""Sharded embedding extraction (no clip dropped or duplicated) and the evaluate CLI."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miles_jax import checkpoints, config_lib, parallel, pretrained
from miles_jax.data import pipeline, synthetic
from miles_jax.evaluation import extract, retrieval
from miles_jax.models import dual_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("syn"))
  paths = synthetic.generate(d, num_train=8, num_eval=13, resolution=32, frames=4, verbose=False)
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.model.video.num_frames = 4
  c.data.num_frames, c.data.max_len = 4, 16
  c.data.eval, c.data.tokenizer = paths["eval"], paths["tokenizer"]
  model = dual_encoder.build(c.model)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 32, 32, 3)),
                               jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32))
                    ["params"])
  return c, model, params, d


@pytest.mark.parametrize("batch", [3, 8])
def test_sharded_extraction_covers_every_clip_once(setup, batch):
  c, model, params, _ = setup
  mesh = parallel.make_mesh((-1,), ("data",))
  assert mesh.size == 8
  rules = parallel.logical_rules(c.sharding.rules, mesh)
  es = pipeline.load_eval_set(c.data.eval, c, batch_size=batch)
  assert len(es.video_ids) == 13  # 13 does not divide by the global batch (8 or 16)
  emb = extract.Embedder(c.model, mesh, rules)
  video = emb.videos(params, es, batch)
  text = emb.texts(params, es.input_ids, es.attention_mask, batch)
  # independent: one clip at a time, no mesh
  for i in range(13):
    frames = pretrained.normalize_frames(es.clips[list(es.clip_index).index(i)][None])
    want = model.apply({"params": params}, frames, method=model.encode_video)["embed"]
    np.testing.assert_allclose(video[i], np.asarray(want)[0], atol=2e-5)
  want_t = model.apply({"params": params}, es.input_ids, es.attention_mask,
                       method=model.encode_text)["embed"]
  np.testing.assert_allclose(text, want_t, atol=2e-5)


def test_evaluate_cli_prints_table_and_writes_json(setup, tmp_path):
  c, _, params, d = setup
  export = str(tmp_path / "export")
  checkpoints.save_params(export, params, c.model)
  out = str(tmp_path / "res.json")
  args = [sys.executable, "-m", "miles_jax.evaluate", f"--config=configs/demo.py:{d}",
          f"--checkpoint={export}", f"--out={out}", "--config.data.eval_batch_size=5"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "text → video" in r.stdout and "random chance" in r.stdout
  res = json.load(open(out))["retrieval"]
  # the same numbers as computing them here from the model directly
  m = pretrained.load(export)
  es = pipeline.load_eval_set(c.data.eval, c)
  v = m.encode_video(pretrained.normalize_frames(es.clips))
  t = m.encode_text(es.input_ids, es.attention_mask)
  want = retrieval.retrieval_metrics(retrieval.cosine_similarity(t, v), es.text_to_video)
  for k in ("t2v_R1", "t2v_R5", "t2v_MdR", "v2t_R1", "v2t_MnR"):
    assert res[k] == pytest.approx(want[k], abs=1e-6), k
  # missing model: a clear error, exit 2
  r = subprocess.run(args[:4] + [f"--checkpoint={tmp_path / 'nope'}"], cwd=ROOT,
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 2 and "nope" in r.stderr
