"""python -m miles_jax.train --config=configs/FILE.py[:ARG] --workdir=DIR [--config.a.b=v ...]

Pre-training and fine-tuning (the config picks the objectives). Re-running the same command
resumes from the newest checkpoint in --workdir. On several hosts (TPU pod slices, SLURM) run
the same command on every host: `jax.distributed.initialize()` is called when the environment
describes a multi-host job, or explicitly with --coordinator_address/--num_processes/--process_id.
"""
from __future__ import annotations

from miles_jax.cli import setup_process

if __name__ == "__main__":  # before TensorFlow / jaxlib load: the log filter, path settings
  setup_process()

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from miles_jax import cli, cluster, paths

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py or "
                                "configs/pretrain_miles.py:base; override any field with "
                                "--config.FIELD=VALUE.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and figures.")
cluster.define_flags()
FLAGS = flags.FLAGS


def report(result: dict, workdir: str):
  """Final table with the random-chance row, curves and results.json (process 0)."""
  import jax
  from miles_jax.evaluation import retrieval
  from miles_jax.train import loop
  if jax.process_index() != 0:
    return
  out = {"step": result["step"], "train": result["train"], "eval": result["eval"]}
  retr = [e for e in result.get("evaluators", []) if e.name == "retrieval"]
  chance = None
  if retr and result["eval"]:
    model = {k.split("/", 1)[1]: v for k, v in result["eval"].items() if k.startswith("retrieval/")}
    chance = retr[0].chance()
    print()
    compare_to = FLAGS.config.get("debug", {}).get("compare_to", "")
    reference = retrieval.reference_rows(_repo_path(compare_to), int(model["num_texts"]))
    print(retrieval.format_table({"miles_jax": model, **reference, "random chance": chance},
                                 f"held-out retrieval ({int(model['num_texts'])} texts, "
                                 f"{int(model['num_videos'])} videos)"))
    out["chance"] = chance
    if reference:
      out["reference"] = reference
  figures = loop.plot_curves(workdir, chance)
  results = paths.join(workdir, "results.json")
  paths.write_text(results, json.dumps(out, indent=2, default=float))
  if figures:
    print("figures: " + ", ".join(figures))
  print(f"results: {results}")


def _repo_path(path: str) -> str:
  """A relative debug.compare_to is looked up from the working directory, then the checkout."""
  if not path or os.path.isabs(path) or os.path.exists(path):
    return path
  from miles_jax import config_lib
  return os.path.join(os.path.dirname(os.path.dirname(config_lib.default_config_path())), path)


def main(argv):
  if FLAGS.config is None or not FLAGS.workdir:
    print("error: --config and --workdir are required (see --help)", file=sys.stderr)
    return 2
  if cluster.init_from_flags_exit_code():
    return 2
  from miles_jax.train import loop
  result = {}

  def run():
    result.update(loop.train(FLAGS.config, FLAGS.workdir))

  code = loop.main_exit_code(run)
  if code == 0 and not result.get("preempted"):
    report(result, FLAGS.workdir)
  return code


if __name__ == "__main__":
  cli.run(main)
