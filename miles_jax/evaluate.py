"""python -m miles_jax.evaluate --config=configs/FILE.py[:ARG] (--workdir=DIR | --checkpoint=PATH)

Retrieval (text->video, video->text R@1/5/10/50, MdR, MnR) or zero-shot action recognition
(top-1/top-5 over class-name prompts) on `config.data.eval` (every split of
`data.eval_splits`, with mean ± std), printed in the papers' table layout and written as JSON
with the protocol (docs/evaluation.md). The model comes from the newest checkpoint of a training
--workdir, or from --checkpoint: an exported model directory (`WORKDIR/export`, `convert`
output) or a PyTorch `.pth`/`.safetensors` in the released layout. Results go to one file per
dataset and checkpoint; embeddings are cached beside it under a fingerprint of the params,
eval files, model, frames, tokenizer and caption length, and are verified on load. On several
hosts run the same command on every host (the multi-host flags are train's: JAX's cluster
detection, or --coordinator_address/--num_processes/--process_id); process 0 writes the files.
"""
from __future__ import annotations

from miles_jax.cli import setup_process

if __name__ == "__main__":  # before TensorFlow / jaxlib load: the log filter, path settings
  setup_process()

import json
import os
import sys

import numpy as np

from absl import flags
from ml_collections import config_flags

from miles_jax import cli, cluster, paths

config_flags.DEFINE_config_file("config", None, "Config file whose data.eval / data.tokenizer / "
                                "evaluators are used, e.g. configs/zeroshot.py:msrvtt.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "A training workdir: its newest checkpoint is evaluated.")
flags.DEFINE_string("checkpoint", None, "Exported model dir, or .pth/.safetensors (PyTorch).")
flags.DEFINE_string("out", None, "Output JSON (default: WORKDIR/eval/{dataset}-step{N}.json, "
                    "or {checkpoint}_eval_{dataset}.json beside --checkpoint).")
flags.DEFINE_bool("no_cache", False, "Recompute embeddings even when cached.")
cluster.define_flags()  # on several hosts: the same command on every host, as for train
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


def default_out(config, workdir: str | None, checkpoint: str | None, step) -> str:
  """One results file per dataset and checkpoint: WORKDIR/eval/{dataset}-step{N}.json, or
  {checkpoint stem}_eval_{dataset}.json beside --checkpoint."""
  from miles_jax.evaluation import protocol
  name = protocol.dataset_name(config)
  if workdir:
    return paths.join(workdir, "eval", f"{name}-step{step}.json")
  return os.path.splitext(checkpoint.rstrip("/"))[0] + f"_eval_{name}.json"


def _check_out(out: str, results: dict):
  """Refuses to overwrite a results file of another dataset, eval files or checkpoint."""
  if not paths.exists(out):
    return
  try:
    old = json.loads(paths.read_text(out))
  except (OSError, ValueError):
    return
  for k in ("dataset", "files_sha256", "checkpoint_sha256"):
    if k in old and old[k] != results[k]:
      raise ValueError(f"--out={out} holds the results of another evaluation ({k} "
                       f"{old[k]!r:.40} != {results[k]!r:.40}); give another --out or remove it")


def _mean_std(per_split: dict) -> tuple:
  keys = [k for k, v in next(iter(per_split.values())).items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)]
  vals = {k: np.asarray([float(r[k]) for r in per_split.values()]) for k in keys}
  return ({k: float(v.mean()) for k, v in vals.items()},
          {k: float(v.std()) for k, v in vals.items()})  # population std (ddof=0)


def evaluate(config, workdir=None, checkpoint=None, out=None, use_cache=True) -> dict:
  import jax

  from miles_jax import config_lib, parallel
  from miles_jax.evaluation import protocol, retrieval
  from miles_jax.train import loop

  if not config.data.eval:
    raise ValueError("config.data.eval is empty: set it to the eval shards' glob")
  config_lib.validate(config, needs_train_data=False)
  params, model_config, step = load_params(config, workdir, checkpoint)
  config.unlock()
  config.model = model_config
  mesh = parallel.mesh_from_config(config)
  rules = parallel.logical_rules(config.sharding.rules, mesh)
  out = paths.resolve(out or default_out(config, workdir, checkpoint, step))
  params_fp = protocol.params_fingerprint(params)
  splits = config_lib.eval_patterns(config)
  results = {"checkpoint": checkpoint or workdir, "checkpoint_sha256": params_fp, "step": step,
             "package": f"miles_jax {protocol.package_version()}",
             "dataset": protocol.dataset_name(config), "data": config.data.eval,
             "splits": [name for name, _ in splits]}
  cache_dir = paths.join(paths.dirname(out), "embeddings") if use_cache else None
  per_split, fingerprints = {}, []
  for name, pattern in splits:
    for ev in loop.build_evaluators(config, mesh, rules, pattern=pattern, split=name):
      res = ev.run(params, cache_dir=cache_dir, params_fp=params_fp)
      per_split.setdefault(ev.name, {})[name] = res
      line, off = protocol.gallery_check(res["protocol"])
      results.setdefault("gallery_size", {})[name] = {
          "videos": int(res["protocol"]["num_videos"]),
          "expected": int(res["protocol"].get("num_videos_expected", 0)), "differs": off}
      fingerprints.append(res["protocol"]["files_sha256"])
      title = f"{results['dataset']} {name} ({pattern})"
      if ev.name == "retrieval":
        print(retrieval.format_table({"miles_jax": res, "random chance": ev.chance()},
                                     f"{title}: {int(res['num_texts'])} texts, "
                                     f"{int(res['num_videos'])} videos"))
        if name == splits[0][0]:
          write_gallery(ev, params, cache_dir, params_fp, workdir, out)
      print(f"{title} {line}")
      if off:
        print(f"WARNING: {title}: {line.split(' -- ')[0]}: recall is not comparable with "
              "published numbers", file=sys.stderr)
      else:
        print(f"zero-shot classification, {title}: "
              + " ".join(f"{k}={v:.2f}" for k, v in res.items() if isinstance(v, float)))
  results["files_sha256"] = ",".join(fingerprints)
  _check_out(out, results)
  for kind, runs in per_split.items():
    if len(runs) == 1:
      results[kind] = next(iter(runs.values()))
      continue
    mean, std = _mean_std(runs)
    results[kind] = {"per_split": runs, "mean": mean, "std": std}
    print(f"{kind} over splits {', '.join(runs)}: " + " ".join(
        f"{k}={mean[k]:.2f}±{std[k]:.2f}" for k in mean if not k.startswith("num_")))
  if jax.process_index() == 0:
    paths.write_text(out, json.dumps(results, indent=2, default=float))
    print(f"results: {out}")
  return results


def write_gallery(ev, params, cache_dir, params_fp, workdir, out):
  """WORKDIR/gallery.html (or gallery.html beside --out): held-out captions, their top-5 clips as
  frame strips, the correct clip marked (miles_jax/gallery.py). Process 0 of one-host runs."""
  import jax
  if jax.process_count() > 1:
    return None
  from miles_jax import gallery
  path = paths.join(workdir if workdir else paths.dirname(out), "gallery.html")
  print(f"gallery: {gallery.write_eval_gallery(ev, params, path, cache_dir, params_fp)}")
  return path


def main(argv):
  if FLAGS.config is None or bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    print("error: give --config and exactly one of --workdir / --checkpoint", file=sys.stderr)
    return 2
  if cluster.init_from_flags_exit_code():
    return 2
  try:
    evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.out, not FLAGS.no_cache)
  except (ValueError, FileNotFoundError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  cli.run(main)
