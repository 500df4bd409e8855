"""Worker for tests/test_evaluate_multihost.py: retrieval + zero-shot metrics of a tiny model
with seeded random weights, on a mesh whose batch shards alternate between processes.

  python tests/support/multihost_eval.py RETRIEVAL_GLOB LABELLED_GLOB TOKENIZER OUT.json PORT PROCESS_ID
"""
import json
import os
import sys

import jax


def tiny_config(retrieval_glob: str, tokenizer: str):
  from miles_jax import config_lib
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.data.num_frames, c.data.max_len = 4, 16
  c.data.eval, c.data.tokenizer = retrieval_glob, tokenizer
  c.data.eval_batch_size = 3  # 13 videos, 5 classes x 5 prompts: nothing divides evenly
  return c


def interleaved(devices) -> list:
  """Devices ordered so the owning process alternates along the mesh (0,1,0,1,... with 2)."""
  by_proc = {}
  for d in sorted(devices, key=lambda d: d.id):
    by_proc.setdefault(d.process_index, []).append(d)
  return [d for group in zip(*by_proc.values()) for d in group]


def evaluate_all(retrieval_glob: str, labelled_glob: str, tokenizer: str, devices) -> dict:
  import flax.linen as nn
  import jax.numpy as jnp
  from miles_jax import parallel
  from miles_jax.evaluation import evaluators
  from miles_jax.models import dual_encoder
  c = tiny_config(retrieval_glob, tokenizer)
  mesh = parallel.make_mesh((-1,), ("data",), devices)
  rules = parallel.logical_rules(c.sharding.rules, mesh)
  model = dual_encoder.build(c.model)
  params = nn.unbox(model.init(jax.random.PRNGKey(7), jnp.zeros((1, 4, 32, 32, 3)),
                               jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32))
                    ["params"])
  retr = evaluators.RetrievalEvaluator(c, mesh, rules)
  text, video = retr.embeddings(params)
  zs = evaluators.ZeroShotEvaluator(c, mesh, rules, pattern=labelled_glob)
  return {"retrieval": evaluators.summary(retr.run(params)),
          "zeroshot": evaluators.summary(zs.run(params)),
          "text": text.tolist(), "video": video.tolist(),
          "owners": [d.process_index for d in mesh.devices.flat]}


def main(argv):
  retrieval_glob, labelled_glob, tokenizer, out, port, pid = argv[1:]
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(pid), coordinator_bind_address=f"127.0.0.1:{port}")
  res = evaluate_all(retrieval_glob, labelled_glob, tokenizer, interleaved(jax.devices()))
  with open(f"{out}.{pid}", "w") as f:
    json.dump(res, f)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  main(sys.argv)
