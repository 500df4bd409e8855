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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_multi_clip_embedding_is_the_mean_over_clips(setup):
  c, model, params, _ = setup
  c = c.copy_and_resolve_references()
  c.data.num_frames, c.data.eval_clips = 2, 2
  es = pipeline.load_eval_set(c.data.eval, c)
  assert es.clips.shape[1] == 4  # 2 clips x 2 frames, clip-major
  mesh = parallel.make_mesh((-1,), ("data",))
  rules = parallel.logical_rules(c.sharding.rules, mesh)
  got = extract.Embedder(c.model, mesh, rules, num_clips=2).videos(params, es, 3)
  order = np.argsort(es.clip_index)
  clips = [pretrained.normalize_frames(es.clips[order][:, k * 2:(k + 1) * 2]) for k in range(2)]
  want = np.mean([np.asarray(model.apply({"params": params}, f, method=model.encode_video)
                             ["embed"]) for f in clips], axis=0)
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.slow
def test_zeroshot_every_split_mean_std_and_config_templates(setup, tmp_path):
  """Three split-named shard sets: each is evaluated, mean ± std over them, with the prompt
  templates of the config; checked against numpy from the model's own embeddings."""
  from miles_jax import evaluate
  from miles_jax.data import prepare, schema
  c0, model, params, d = setup
  export = str(tmp_path / "export")
  checkpoints.save_params(export, params, c0.model)
  rng = np.random.default_rng(0)
  classes = ["red", "green", "blue"]
  for s in range(1, 4):
    recs = [schema.make_example(f"s{s}v{i}", [classes[(i + s) % 3]],
                                rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8),
                                label=(i + s) % 3).SerializeToString() for i in range(5)]
    prepare.write_records(str(tmp_path / f"test{s}-00000-of-00001.tfrecord"), recs)
  templates = ("{}", "a clip of {}.")
  c = config_lib.default_config()
  c.model = c0.model
  c.evaluators = "zeroshot"
  c.data.num_frames, c.data.tokenizer = 4, c0.data.tokenizer
  c.data.eval = str(tmp_path / "{split}-*.tfrecord")
  c.data.eval_splits = "test1,test2,test3"
  c.zeroshot.templates = templates
  res = evaluate.evaluate(c, checkpoint=export)["zeroshot"]
  assert sorted(res["per_split"]) == ["test1", "test2", "test3"]
  m = pretrained.load(export)
  top1 = []
  for s in ("test1", "test2", "test3"):
    cs = c.copy_and_resolve_references()
    cs.data.eval, cs.data.eval_splits = str(tmp_path / f"{s}-*.tfrecord"), ""
    es = pipeline.load_eval_set(cs.data.eval, cs)
    v = np.asarray(m.encode_video(pretrained.normalize_frames(es.clips)), np.float64)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    cls = []
    for name in es.class_names:
      ids, att = pipeline.build_tokenizer(c.data.tokenizer, 64).tokenize_numpy(
          [t.format(name) for t in templates])
      cls.append(unit(unit(np.asarray(m.encode_text(ids, att), np.float64)).mean(0)))
    pred = np.argmax(unit(v) @ np.stack(cls).T, axis=1)
    top1.append(100.0 * np.mean(pred == es.labels))
    assert res["per_split"][s]["top1"] == pytest.approx(top1[-1])
    assert res["per_split"][s]["protocol"]["templates"] == list(templates)
  assert res["mean"]["top1"] == pytest.approx(np.mean(top1))
  assert res["std"]["top1"] == pytest.approx(np.std(top1))


def test_validation_split_selects_the_best_checkpoint_and_is_recorded(setup, tmp_path):
  from miles_jax.train import loop
  c0, _, params, _ = setup
  c = c0.copy_and_resolve_references()
  c.data.val, c.data.eval = c0.data.eval, str(tmp_path / "no-test-split-*.tfrecord")
  mesh = parallel.make_mesh((-1,), ("data",))
  rules = parallel.logical_rules(c.sharding.rules, mesh)
  (ev,) = loop.build_evaluators(c, mesh, rules)
  assert ev.pattern == c0.data.eval and ev.protocol()["split"] == "eval"
  loop._keep_best(c, params, {"retrieval/t2v_R1": 5.0}, "retrieval/t2v_R1", str(tmp_path), 3)
  best = json.load(open(tmp_path / "best.json"))
  assert best["step"] == 3 and best["selected_on"].startswith("val (")
  # without a validation split the test split selects, and the record says so
  c.data.val, c.data.eval = "", c0.data.eval
  loop._keep_best(c, params, {"retrieval/t2v_R1": 6.0}, "retrieval/t2v_R1", str(tmp_path), 4)
  assert json.load(open(tmp_path / "best.json"))["selected_on"].startswith("test (")
