"""`python -m miles_jax.data.prepare ... --runner=RUNNER`: prepare's shard tasks as an Apache Beam
pipeline, for item lists one machine's process pool takes too long over (docs/data.md,
"Preparing at scale with Beam").

Nothing here decides what goes where: prepare.plan_shards assigns items to shards (from the item
list alone) and skips shards already complete, and prepare.process_shard decodes a shard's items
and writes it, exactly as the process pool does. The pipeline only spreads those tasks over the
runner's workers:

    Create(task files) | Reshuffle | Map(process_shard of the task read from its file)

Each task travels as a small JSON file beside its shard (`OUT/.NAME.task.json`, through the path
layer, so OUT may be gs://) rather than inside the pipeline graph, which a runner such as Dataflow
caps in size; the driver removes them when the pipeline is done and then reads every shard's
sidecar (`OUT/.NAME.json`) to build report.json with prepare.summarize, the pool's own function.
A retried or repeated task rewrites its shard whole under the same name (write then rename, or one
GCS object), so a rerun never duplicates records.

apache_beam is imported only when a pipeline runs (the [beam] extra); `check` tells a user without
it what to install.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Callable, Optional, Sequence

from miles_jax import paths

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")
INSTALL = "pip install 'miles_jax[beam]' (apache-beam[gcp]==2.77.0)"


def check(runner: Optional[str], options: Sequence[str]) -> Optional[str]:
  """The problem with `--runner` / `--beam_option` as one line, or None when they can run."""
  if not runner:
    return "--beam_option needs --runner (e.g. --runner=DirectRunner)"
  if runner not in RUNNERS:
    return f"--runner={runner}: use one of {', '.join(RUNNERS)}"
  for o in options:
    if not o or o.startswith("-") or not o.split("=", 1)[0].strip():
      return (f"--beam_option={o}: write KEY=VALUE (or KEY) without dashes, e.g. "
              "--beam_option=region=us-central1")
  try:
    import apache_beam  # noqa: F401
  except ImportError:
    return f"--runner={runner} needs Apache Beam, which is not installed: {INSTALL}"
  return None


def pipeline_args(runner: str, options: Sequence[str], workers: int = 1) -> list:
  """Beam's command-line options: --runner, then each KEY=VALUE as --KEY=VALUE. DirectRunner with
  `workers` > 1 runs in its multi-process mode on that many processes unless the options choose
  (`direct_running_mode`, `direct_num_workers`)."""
  args = [f"--runner={runner}"]
  keys = {o.split("=", 1)[0] for o in options}
  if runner == "DirectRunner" and workers > 1:
    if "direct_running_mode" not in keys:
      args.append("--direct_running_mode=multi_processing")
    if "direct_num_workers" not in keys:
      args.append(f"--direct_num_workers={workers}")
  return args + ["--" + o for o in options]


def task_file(task: dict) -> str:
  return os.path.join(task["out"], f".{task['name']}.task.json")


def _resolve(function: str) -> Callable:
  module, name = function.split(":")
  return getattr(importlib.import_module(module), name)


def _run_task(path: str, function: str) -> str:
  """A worker's step: reads one task file and runs the shard writer on it."""
  task = json.loads(paths.read_text(path))
  task["eval_frames"] = tuple(task.get("eval_frames", ()))
  return _resolve(function)(task)["shard"]


def run_shards(function: str, tasks: list, runner: str, options: Sequence[str] = (),
               workers: int = 1, sidecar: Optional[Callable] = None) -> list:
  """Runs `function` ("module:name", prepare's shard writer) on every task in a Beam pipeline
  on `runner`; returns the shard reports read back from their sidecars (`sidecar(out, name)`)."""
  if not tasks:
    return []
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  files = []
  for t in tasks:
    files.append(task_file(t))
    paths.write_text(files[-1], json.dumps(t))
  try:
    opts = PipelineOptions(pipeline_args(runner, options, workers))
    with beam.Pipeline(options=opts) as p:
      _ = (p | "ShardTasks" >> beam.Create(files)
           | "Spread" >> beam.Reshuffle()
           | "WriteShard" >> beam.Map(_run_task, function))
  finally:
    for f in files:
      try:
        paths.Path(f).unlink()
      except FileNotFoundError:
        pass
  reports = []
  for t in tasks:
    report = json.loads(paths.read_text(sidecar(t["out"], t["name"])))
    if report.get("items") != [it["video_id"] for it in t["items"]]:
      raise RuntimeError(f"{t['name']}: the pipeline ended without writing this shard")
    reports.append(report)
  return reports
