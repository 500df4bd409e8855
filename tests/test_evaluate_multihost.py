"""2-process evaluation (gloo on 127.0.0.1, 2 CPU devices each) on a mesh whose batch shards
alternate between the processes (owners 0,1,0,1 — as TPU pods interleave hosts) gives exactly
the 1-process retrieval and zero-shot metrics."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from miles_jax.data import schema, synthetic

import multihost_eval  # noqa: E402

import helpers  # noqa: E402  (tests/support/ is on sys.path)

pytestmark = pytest.mark.slow  # several processes: the full suite only
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["red circle", "blue square", "green star", "yellow ring", "white box"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("syn"))
  paths = synthetic.generate(d, num_train=8, num_eval=13, resolution=32, frames=4, verbose=False)
  rng = np.random.default_rng(0)
  for s in range(2):  # 11 labelled videos in 2 shards
    with tf.io.TFRecordWriter(os.path.join(d, f"labelled-{s}.tfrecord")) as w:
      for i in range(s, 11, 2):
        frames = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
        k = i % len(CLASSES)
        w.write(schema.make_example(f"v{i}", [CLASSES[k]], frames, label=k).SerializeToString())
  return paths["eval"], os.path.join(d, "labelled-*.tfrecord"), paths["tokenizer"]


def test_interleaved_two_process_eval_equals_one_process(data, tmp_path):
  import jax
  retrieval_glob, labelled_glob, tokenizer = data
  out, port = str(tmp_path / "res.json"), helpers.free_port()
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2",
             CUDA_VISIBLE_DEVICES="")
  worker = os.path.join(ROOT, "tests", "support", "multihost_eval.py")
  procs = [subprocess.Popen([sys.executable, worker,
                             retrieval_glob, labelled_glob, tokenizer, out, str(port), str(i)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  for p in procs:
    try:
      _, err = p.communicate(timeout=240)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, err[-3000:]
  got = [json.load(open(f"{out}.{i}")) for i in range(2)]
  assert got[0]["owners"] == [0, 1, 0, 1]

  # 1 process, 4 devices, plain device order
  want = multihost_eval.evaluate_all(retrieval_glob, labelled_glob, tokenizer,
                                     jax.devices()[:4])
  for g in got:  # every host computes the same metrics
    assert g["retrieval"] == want["retrieval"]
    assert g["zeroshot"] == want["zeroshot"]
    np.testing.assert_allclose(g["text"], want["text"], atol=1e-5)
    np.testing.assert_allclose(g["video"], want["video"], atol=1e-5)
  # rows differ, so captions permuted against their videos could not pass the comparison
  text = np.asarray(want["text"])
  assert len({tuple(np.round(r, 4)) for r in text}) > len(text) // 2
