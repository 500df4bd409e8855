"""python -m miles_jax.evaluate --config=configs/FILE.py[:ARG] (--workdir=DIR | --checkpoint=PATH)

Retrieval (text->video, video->text R@1/5/10/50, MdR, MnR) or zero-shot action recognition
(top-1/top-5 over class-name prompts) on `config.data.eval`, printed in the papers' table
layout and written as JSON. The model comes from the newest checkpoint of a training
--workdir, or from --checkpoint: an exported model directory (`WORKDIR/export`, `convert`
output) or a PyTorch `.pth`/`.safetensors` in the released layout. Embeddings are cached beside
the output JSON, so re-running with other metrics costs nothing.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from miles_jax import cli, paths

config_flags.DEFINE_config_file("config", None, "Config file whose data.eval / data.tokenizer / "
                                "evaluators are used, e.g. configs/zeroshot.py:msrvtt.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "A training workdir: its newest checkpoint is evaluated.")
flags.DEFINE_string("checkpoint", None, "Exported model dir, or .pth/.safetensors (PyTorch).")
flags.DEFINE_string("out", None, "Output JSON (default: WORKDIR/eval/results.json, or "
                    "eval_results.json beside --checkpoint).")
flags.DEFINE_bool("no_cache", False, "Recompute embeddings even when cached.")
FLAGS = flags.FLAGS


def load_params(config, workdir: str | None, checkpoint: str | None):
  """-> (params, model config, step or None)."""
  import jax

  from miles_jax import checkpoints, pretrained
  if checkpoint:
    model = pretrained.load(checkpoint, config.model if not paths.isdir(checkpoint) else None)
    return model.params, model.config, None
  from miles_jax import parallel
  from miles_jax.models import dual_encoder
  from miles_jax.train import optim
  from miles_jax.train.state import create_train_state, train_state_shardings
  saved = paths.join(workdir, "config.json")
  if paths.exists(saved):
    import ml_collections
    train_config = ml_collections.ConfigDict(json.loads(paths.read_text(saved)))
    diffs = checkpoints.diff_configs(train_config.model.to_dict(), config.model.to_dict())
    if diffs:
      print("note: using the workdir's model config (it differs from --config in: "
            + "; ".join(diffs) + ")", file=sys.stderr)
    config.unlock()
    config.model = train_config.model
    for k in ("objectives",):
      config[k] = train_config[k]
    config.mvm.target_space = train_config.mvm.target_space
  ckpt = checkpoints.TrainCheckpointer(paths.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"--workdir={workdir} holds no checkpoint")
  mesh = parallel.mesh_from_config(config)
  model = dual_encoder.build(config.model)
  tx = optim.make_optimizer(config)[0]
  abstract = jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(0), mesh,
                                                       model, tx))
  sh = train_state_shardings(config, mesh, model, tx)
  state, _ = ckpt.restore(checkpoints.abstract_with_shardings(abstract, sh), step)
  ckpt.close()
  return state.params, config.model, step


def evaluate(config, workdir=None, checkpoint=None, out=None, use_cache=True) -> dict:
  import jax

  from miles_jax import config_lib, parallel
  from miles_jax.evaluation import retrieval
  from miles_jax.train import loop

  if not config.data.eval:
    raise ValueError("config.data.eval is empty: set it to the eval shards' glob")
  config_lib.validate(config, needs_train_data=False)
  params, model_config, step = load_params(config, workdir, checkpoint)
  config.unlock()
  config.model = model_config
  mesh = parallel.mesh_from_config(config)
  rules = parallel.logical_rules(config.sharding.rules, mesh)
  out = out or (paths.join(workdir, "eval", "results.json") if workdir
                else os.path.splitext(checkpoint.rstrip("/"))[0] + "_eval_results.json")
  out = paths.resolve(out)
  results = {"checkpoint": checkpoint or workdir, "step": step, "data": config.data.eval}
  for ev in loop.build_evaluators(config, mesh, rules):
    tag = f"{ev.name}-{os.path.basename(config.data.eval.split(',')[0]).split('*')[0]}"
    cache = None
    if use_cache and ev.name == "retrieval":
      cache = paths.join(paths.dirname(out), f"embeddings-{tag}-step{step}.npz")
    res = ev.run(params, cache=cache) if ev.name == "retrieval" else ev.run(params)
    results[ev.name] = res
    if ev.name == "retrieval":
      print(retrieval.format_table({"miles_jax": res, "random chance": ev.chance()},
                                   f"{config.data.eval}: {int(res['num_texts'])} texts, "
                                   f"{int(res['num_videos'])} videos"))
    else:
      print(f"zero-shot classification on {config.data.eval}: "
            + " ".join(f"{k}={v:.2f}" for k, v in res.items() if isinstance(v, float)))
  if jax.process_index() == 0:
    paths.write_text(out, json.dumps(results, indent=2, default=float))
    print(f"results: {out}")
  return results


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  if FLAGS.config is None or bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    print("error: give --config and exactly one of --workdir / --checkpoint", file=sys.stderr)
    return 2
  try:
    evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.out, not FLAGS.no_cache)
  except (ValueError, FileNotFoundError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  cli.run(main)
