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


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _direct_metrics(export, c, dsl=None):
  """Metrics computed here without the evaluate CLI, its evaluators or its cache; `dsl`: a
  temperature for dual softmax written out in numpy (t2v over texts, v2t over videos)."""
  m = pretrained.load(export)
  es = pipeline.load_eval_set(c.data.eval, c)
  v = np.asarray(m.encode_video(pretrained.normalize_frames(es.clips)), np.float64)
  t = np.asarray(m.encode_text(es.input_ids, es.attention_mask), np.float64)
  sim = (t / np.linalg.norm(t, axis=1, keepdims=True)) @ (
      v / np.linalg.norm(v, axis=1, keepdims=True)).T
  sim_v2t = None
  if dsl:
    sim, sim_v2t = sim * _softmax(sim / dsl, 0), sim * _softmax(sim / dsl, 1)
  return retrieval.retrieval_metrics(sim, es.text_to_video, sim_v2t=sim_v2t)


def test_cache_and_results_never_answer_for_another_evaluation(setup, tmp_path):
  """Two datasets with same-shaped test sets and two checkpoints in one folder: each of the
  four evaluations gets its own numbers and its own results file, twice (second time from
  the verified cache)."""
  from miles_jax import evaluate
  c0, model, params_a, _ = setup
  params_b = nn.unbox(model.init(jax.random.PRNGKey(7), jnp.zeros((1, 4, 32, 32, 3)),
                                 jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32))
                      ["params"])
  data = {}
  for name, seed in (("alpha", 1), ("beta", 2)):
    data[name] = synthetic.generate(str(tmp_path / name), num_train=2, num_eval=6,
                                    resolution=32, frames=4, seed=seed, verbose=False)
  models = tmp_path / "models"
  for name, p in (("ckA", params_a), ("ckB", params_b)):
    checkpoints.save_params(str(models / name), p, c0.model)

  def config(name):
    c = config_lib.default_config()
    c.model = c0.model
    c.data.num_frames, c.data.eval_batch_size = 4, 4
    c.data.eval, c.data.tokenizer = data[name]["eval"], data[name]["tokenizer"]
    # A random tiny model ranks every text's videos alike (a common per-video offset), so
    # plain cosine metrics of 6 clips coincide across models; dual softmax removes the offset
    # and gives the four evaluations four different results.
    c.eval.post, c.eval.dsl_temperature = "dsl", 1e-3
    return c

  seen, wanted = {}, {}
  for _ in range(2):  # the second round reads the verified cache
    for ck in ("ckA", "ckB"):
      for name in ("alpha", "beta"):
        res = evaluate.evaluate(config(name), checkpoint=str(models / ck))
        if (ck, name) not in wanted:
          wanted[(ck, name)] = _direct_metrics(str(models / ck), config(name), dsl=1e-3)
        want = wanted[(ck, name)]
        for k in ("t2v_R1", "t2v_R5", "t2v_MnR", "t2v_MdR", "v2t_R1", "v2t_MnR"):
          assert res["retrieval"][k] == pytest.approx(want[k], abs=1e-6), (ck, name, k)
        seen[(ck, name)] = (res["retrieval"]["t2v_MnR"], res["retrieval"]["v2t_MnR"])
        out = models / f"{ck}_eval_{name}.json"
        saved = json.load(open(out))
        assert saved["dataset"] == name and saved["checkpoint"] == str(models / ck)
        p = saved["retrieval"]["protocol"]
        assert p["dataset"] == name and p["split"] == "eval" and p["num_videos"] == 6
        assert p["num_frames"] == 4 and p["frame_positions"]["exact"]
        assert p["caption_length"] == c0.model.text.max_len
        assert p["post_processing"].startswith("dsl(temperature=0.001")
        assert saved["package"].startswith("miles_jax ")
  assert len(set(seen.values())) == 4, seen  # four evaluations, four different results
  assert len(os.listdir(models / "embeddings")) == 4
  # a results file of another dataset is never overwritten
  with pytest.raises(ValueError, match="another evaluation"):
    evaluate.evaluate(config("beta"), checkpoint=str(models / "ckA"),
                      out=str(models / "ckA_eval_alpha.json"))
