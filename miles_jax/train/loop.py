"""The training loop: mesh -> state (init or restore) -> data -> {step, log, checkpoint, eval}.

The only place with side effects. A run is resumable at any point: the orbax checkpoint holds
the TrainState (online params, optimiser, snapshot params, step, rng) and every host's data
position, and the step's randomness is `fold_in(rng, step)`, so a resumed run continues
exactly as an uninterrupted one would. SIGTERM (TPU preemption) saves and exits 0; with
several processes the decision is collective (JAX's preemption sync point), so every host saves
the same step even when only one of them got the signal. A non-finite loss stops the run (exit
status 3) before anything is saved, so the last good checkpoint stays intact, or, with
`train.on_nonfinite='skip'`, the update is dropped and counted.

The device never waits for the host between steps: batches are built and put on the devices
`train.prefetch` steps ahead by a background thread, and the step's metrics stay on the devices
until a log step or a save reads them (with the non-finite check of every step since the last
read).
"""
from __future__ import annotations

import io
import json
import math
import os
import queue
import signal
import sys
import tempfile
import threading
import time

import jax
import numpy as np

from miles_jax import checkpoints, config_lib, parallel, paths
from miles_jax.data import pipeline
from miles_jax.models import dual_encoder
from miles_jax.train import optim
from miles_jax.train.state import (TrainState, abstract_train_state, create_train_state,
                                   train_state_shardings)
from miles_jax.train.step import METRICS, batch_keys, make_train_step


class NonFiniteLoss(RuntimeError):
  """The loss became NaN/inf; the run stopped without saving."""


class _Preemption:
  """When to save and stop for a preemption notice (SIGTERM).

  One process: a Python SIGTERM handler sets a flag the loop reads after each step. Several
  processes (jax.distributed initialised): the save is collective, so hosts that decide alone
  deadlock; JAX's preemption sync manager (its own SIGTERM notifier in the distributed runtime
  client) tells every host the same step to stop at, `reached_preemption_sync_point(step)`.
  No Python handler is installed then: it would replace the runtime's.
  """

  def __init__(self):
    self.requested = False
    self._old = None
    from jax._src import distributed
    self.collective = distributed.global_state.client is not None

  def __enter__(self):
    if self.collective:
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a test thread)
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def reached(self, step: int) -> bool:
    """True when the run must save `step` and exit; call once per step, steps increasing."""
    if self.collective:
      from jax.experimental import multihost_utils
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class _Prefetcher:
  """Global device batches built `depth` steps ahead by a background thread.

  Each item carries the data iterator's state *after* its batch, so a checkpoint records the
  position of the batches consumed, not of those prefetched. depth 0: built on demand.
  """

  def __init__(self, data, make_batch, depth: int):
    self._data, self._make, self.depth = data, make_batch, int(depth)
    self._stop = threading.Event()
    self._thread = None
    if self.depth > 0:
      self._queue = queue.Queue(maxsize=self.depth)
      self._thread = threading.Thread(target=self._fill, daemon=True, name="prefetch")
      self._thread.start()

  def _produce(self):
    b = next(self._data)
    return self._make(b), self._data.state()

  def _fill(self):
    while not self._stop.is_set():
      try:
        item = ("ok", self._produce())
      except BaseException as e:  # handed to the consumer, raised there
        item = ("error", e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[0] == "error":
        return

  def __next__(self):
    """-> (global batch, data state after it)."""
    if self._thread is None:
      return self._produce()
    kind, value = self._queue.get()
    if kind == "error":
      raise value
    return value

  def close(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)


class _Profile:
  """`train.profile_steps=(a, b)`: a jax.profiler trace of steps a+1..b in WORKDIR/profile,
  on process 0 only unless `train.profile_all_hosts` (every host's trace of a pod is the same
  program; one is what a reader opens). Steps carry StepTraceAnnotation markers (the loop)."""

  def __init__(self, config, workdir: str):
    steps = tuple(int(x) for x in (config.train.get("profile_steps", ()) or ()))
    if steps and (len(steps) != 2 or not 0 <= steps[0] < steps[1]):
      raise ValueError(f"config.train.profile_steps={steps}: give (first, last) step numbers "
                       "with first < last, e.g. (10, 13), or () for no trace")
    if not (_is_main() or config.train.get("profile_all_hosts", False)):
      steps = ()
    self.steps, self.dir, self.active = steps, paths.join(workdir, "profile"), False

  def before(self, step: int):
    if self.steps and step == self.steps[0] and not self.active:
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, done: int, state):
    if self.active and done >= self.steps[1]:
      jax.block_until_ready(state)
      self.close()
      _print(f"profile of steps {self.steps[0] + 1}-{self.steps[1]} written to {self.dir} "
             "(open with TensorBoard's profile plugin or xprof)")

  def close(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _compilation_cache(config, workdir: str):
  """Persistent XLA cache (`train.compilation_cache`): restarts and preemption resumes skip the
  compile. 'auto': WORKDIR/compilation_cache (a gs:// workdir too: JAX reaches it through
  etils.epath) unless JAX_COMPILATION_CACHE_DIR is set; '': off. JAX writes an entry from one
  process and every process reads it."""
  path = str(config.train.get("compilation_cache", "auto"))
  if path == "auto":
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
      return
    path = paths.join(workdir, "compilation_cache")
  if path:
    jax.config.update("jax_compilation_cache_dir", path)


def _barrier(name: str, timeout_s: int = 1800):
  """All processes meet here (distributed runtime client; no device collective)."""
  from jax._src import distributed
  client = distributed.global_state.client
  if client is not None and jax.process_count() > 1:
    client.wait_at_barrier(name, timeout_s * 1000)


def _is_main() -> bool:
  return jax.process_index() == 0


def _print(msg: str):
  if _is_main():
    print(msg, flush=True)


class MetricWriter:
  """TensorBoard scalars + a metrics.jsonl beside them; only process 0 writes.

  On a remote workdir (gs://…) TensorFlow's own GCS filesystem would bypass the URI layer
  (paths.py: emulator, credentials), so the event file is written to a local folder and copied
  to WORKDIR/tensorboard after each flush, and metrics.jsonl is rewritten whole (object stores
  cannot append).
  """

  def __init__(self, workdir: str):
    self.enabled = _is_main()
    self.jsonl = paths.join(workdir, "metrics.jsonl")
    self._tb_dir = paths.join(workdir, "tensorboard")
    self._remote = paths.is_uri(workdir)
    self._lines: list[str] = []
    self._tb = None
    if self.enabled:
      import tensorflow as tf
      local = self._tb_dir
      if self._remote:
        local = self._local_tb = tempfile.mkdtemp(prefix="miles_jax_tb_")
        if paths.exists(self.jsonl):
          self._lines = [paths.read_text(self.jsonl)]
      self._tb = tf.summary.create_file_writer(local)

  def write(self, step: int, scalars: dict, kind: str = "train", perf: dict | None = None):
    """`scalars` as KIND/NAME tags; `perf` (throughput) as perf/NAME tags, kept in the same
    metrics.jsonl row under "perf"."""
    if not self.enabled:
      return
    import tensorflow as tf
    with self._tb.as_default():
      for k, v in scalars.items():
        tf.summary.scalar(f"{kind}/{k}", v, step=step)
      for k, v in (perf or {}).items():
        tf.summary.scalar(f"perf/{k}", v, step=step)
    self._tb.flush()
    row = {"step": step, "kind": kind, **scalars}
    if perf:
      row["perf"] = perf
    line = json.dumps(row) + "\n"
    if not self._remote:
      with open(self.jsonl, "a") as f:
        f.write(line)
      return
    self._lines.append(line)
    paths.write_text(self.jsonl, "".join(self._lines))
    paths.copy_tree(self._local_tb, self._tb_dir)


def check_shared_workdir(config, workdir: str, hosts: list) -> None:
  """Refuses a local `workdir` when the processes (`hosts`: each one's host name) run on more
  than one machine: each host would write its own part of every checkpoint to its own disk and
  a resume could not read them back. Processes of one machine share its disk."""
  if paths.is_uri(workdir) or config.train.get("shared_workdir", False):
    return
  machines = sorted(set(hosts))
  if len(machines) > 1:
    raise ValueError(f"--workdir={workdir} is a local path but the {len(hosts)} processes run on "
                     f"{len(machines)} hosts (each would keep part of every checkpoint): use "
                     "gs://BUCKET/PATH, or --config.train.shared_workdir=True for a mount every "
                     "host shares")


def _host_names() -> list:
  """Every process's host name (crc32 of it: the allgather moves numbers)."""
  import socket
  import zlib
  mine = np.asarray([zlib.crc32(socket.gethostname().encode())], np.int64)
  if jax.process_count() == 1:
    return [int(mine[0])]
  from jax.experimental import multihost_utils
  return [int(v) for v in np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)]


def _count_start(workdir: str, resumed: bool) -> tuple[int, float]:
  """(restarts so far, when the run first started): WORKDIR/run_starts.json, process 0."""
  record = paths.join(workdir, "run_starts.json")
  now = time.time()
  if not _is_main():
    return 0, now
  prev = json.loads(paths.read_text(record)) if resumed and paths.exists(record) else {}
  info = {"starts": int(prev.get("starts", 0)) + 1, "first_start": prev.get("first_start", now)}
  paths.write_text(record, json.dumps(info))
  return info["starts"] - 1, float(info["first_start"])


def _data_state_all_hosts(s: dict) -> list:
  """Every host's data-iterator position (hosts read different files)."""
  local = np.asarray(pipeline.state_to_ints(s), np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    allv = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(local))
  else:
    allv = local[None]
  return [pipeline.ints_to_state(v) for v in allv]


def build_evaluators(config, mesh, rules, pattern=None, split=None) -> list:
  """Evaluators on `pattern`, by default data.val when set (checkpoint selection on a
  validation split) else data.eval."""
  from miles_jax.evaluation import evaluators
  pattern = pattern or config.data.get("val") or config.data.eval
  if not pattern:
    return []
  kinds = [k.strip() for k in str(config.get("evaluators", "retrieval")).split(",") if k.strip()]
  table = {"retrieval": evaluators.RetrievalEvaluator, "zeroshot": evaluators.ZeroShotEvaluator}
  out = []
  for k in kinds:
    if k not in table:
      raise ValueError(f"config.evaluators: unknown evaluator {k!r}; use {sorted(table)}")
    out.append(table[k](config, mesh, rules, pattern=pattern, split=split))
  return out


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir`; returns the last train and eval metrics.

  SIGTERM is honoured from the first line: before the first step it exits cleanly (nothing new
  to save), afterwards it saves the current step first.
  """
  with _Preemption() as preempt:
    return _train(config, workdir, preempt)


def _train(config, workdir: str, preempt: _Preemption) -> dict:
  config_lib.validate(config, workdir=workdir)
  if jax.process_count() > 1 and not paths.is_uri(workdir):
    check_shared_workdir(config, workdir, _host_names())
  mesh = parallel.mesh_from_config(config)
  rules = parallel.logical_rules(config.sharding.rules, mesh)
  _check_batch(config, mesh, rules)
  paths.makedirs(workdir)
  _compilation_cache(config, workdir)
  model = dual_encoder.build(config.model)
  tx, lr_schedule = optim.make_optimizer(config)
  del lr_schedule
  best = config.train.get("best_metric", "") or None
  # Keep-N by step only: a best-by-metric manager may delete the newest checkpoint, which a
  # resume needs. The best model by `train.best_metric` is exported to WORKDIR/best instead.
  ckpt = checkpoints.TrainCheckpointer(paths.join(workdir, "checkpoints"), keep=config.train.keep)
  if ckpt.latest_step() is not None:
    _check_same_model(paths.join(workdir, "config.json"), config)
  if _is_main():
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  data = pipeline.make_train_iterator(config, seed=config.seed)
  shardings = train_state_shardings(config, mesh, model, tx)
  latest = ckpt.latest_step()
  if latest is None:
    state = create_train_state(config, jax.random.PRNGKey(config.seed), mesh, model, tx)
    _print(f"initialised a new run in {workdir} on mesh {dict(mesh.shape)}")
  else:
    state, meta = ckpt.restore(abstract_train_state(config, mesh, model, tx), latest)
    hosts = meta.get("data", [])
    if len(hosts) != jax.process_count():
      _print(f"checkpoint step {latest} was written by {len(hosts)} processes, this run has "
             f"{jax.process_count()}: every host starts the next data epoch")
    data.restore(pipeline.resume_state(hosts, jax.process_index(), jax.process_count()))
    _print(f"resumed {workdir} from step {latest}")
  state = _maybe_init_from(config, state, shardings)

  step_fn = make_train_step(config, mesh, model, tx)
  evaluators = build_evaluators(config, mesh, rules)
  writer = MetricWriter(workdir)
  total = int(config.train.steps)
  start = int(jax.device_get(state.step))
  clips_per_step = int(config.data.batch_size)
  restarts, first_start = _count_start(workdir, resumed=latest is not None)
  chips = jax.device_count()
  last, eval_metrics, skipped = {}, {}, [0]
  t0, window_start, window_steps = time.time(), time.time(), 0
  data_state = data.state()
  # Device-side metrics of the steps not yet read: [(step number, {name: jax.Array})].
  pending: list = []
  sync_every_step = bool(config.get("debug", {}).get("sync_every_step", False))

  def read_metrics_since_last() -> dict:
    """Fetches the pending steps' metrics; stops the run at the first non-finite loss."""
    nonlocal pending
    got, pending = jax.device_get(pending), []
    out = {}
    for done, m in got:
      m = {k: float(v) for k, v in m.items()}
      if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
        if config.train.on_nonfinite == "skip":
          skipped[0] += 1
          _print(f"step {done}: non-finite loss, update skipped ({skipped[0]} so far)")
        else:
          ckpt.wait_until_finished()
          raise NonFiniteLoss(
              f"step {done}: loss is {m['loss']} ({_fmt(m)}); stopped without "
              f"saving — the last good checkpoint is step {ckpt.latest_step()} in "
              f"{ckpt.directory}. Lower optim.lr, raise optim.warmup_steps, or set "
              "train.on_nonfinite=skip")
      out = m
    out["skipped_steps"] = skipped[0]
    return out

  def save(step, force=False, metrics=None):
    read_metrics_since_last()  # a NaN since the last read must not reach a checkpoint
    ckpt.save(step, state, {"data": _data_state_all_hosts(data_state), "step": step},
              metrics=metrics, force=force)

  # Hosts arrive here after unequal host work (process 0 writes config.json and starts the
  # TensorBoard writer); gloo gives a peer only 30 s to join the first step's collectives, the
  # coordination service's barrier waits as long as start-up may take.
  _barrier(f"miles_jax_train_start_{start}")
  if preempt.reached(start):
    ckpt.close()
    _print(f"SIGTERM before the first step: nothing new to save (step {start}); exiting")
    return {"train": {}, "eval": {}, "preempted": True, "step": start}

  nan_at = int(config.get("debug", {}).get("inject_nan_at_step", -1))
  keys = batch_keys(config)
  next_step = [start]

  def make_batch(local):
    step = next_step[0]
    next_step[0] += 1
    local = {k: local[k] for k in keys}
    if step == nan_at:  # fault injection for the tests: the loss of this step is NaN
      local["frames"] = np.full(local["frames"].shape, np.nan, np.float32)
    return parallel.global_batch(local, mesh, rules)

  profile = _Profile(config, workdir)
  batches = _Prefetcher(data, make_batch, config.train.get("prefetch", 2) if start < total else 0)
  try:
    for step in range(start, total):
      profile.before(step)
      batch, data_state = next(batches)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        state, metrics = step_fn(state, batch)
      del batch
      done = step + 1
      pending.append((done, metrics))
      profile.after(done, state)
      window_steps += 1
      if sync_every_step or done % config.train.log_every == 0 or done == total:
        last = read_metrics_since_last()
      if done % config.train.log_every == 0 or done == total:
        now = time.time()
        sps = window_steps / max(now - window_start, 1e-9)
        eta = (total - done) / max(sps, 1e-9)
        _print(f"step {done}/{total} | {_fmt(last)} | {sps:.2f} steps/s | "
               f"{sps * clips_per_step:.1f} clips/s | ETA {_hms(eta)}")
        writer.write(done, {k: last[k] for k in (*METRICS, "skipped_steps") if k in last},
                     perf={"steps_per_sec": sps, "clips_per_sec": sps * clips_per_step,
                           "clips_per_sec_per_chip": sps * clips_per_step / chips,
                           "eta_hours": eta / 3600,
                           "wall_clock_hours": (now - first_start) / 3600,
                           "restarts": restarts})
        window_start, window_steps = now, 0
      if evaluators and config.train.eval_every and (done % config.train.eval_every == 0
                                                      or done == total):
        eval_metrics = _evaluate(evaluators, state.params, writer, done)
        _keep_best(config, state.params, eval_metrics, best, workdir, done)
      if preempt.reached(done):
        save(done, force=True)
        ckpt.close()
        # every host says it: on a pod, each worker's log shows the step it saved
        print(f"SIGTERM: saved step {done} to {ckpt.directory}; exiting (process "
              f"{jax.process_index()} of {jax.process_count()})", flush=True)
        return {"train": last, "eval": eval_metrics, "preempted": True, "step": done}
      if done % config.train.checkpoint_every == 0 or done == total:
        save(done, force=True)
  finally:
    batches.close()
    profile.close()
  if start >= total:
    _print(f"{workdir}: already trained to step {start} (train.steps={total})")
  if evaluators and not eval_metrics:
    eval_metrics = _evaluate(evaluators, state.params, writer, max(start, total))
  ckpt.close()
  export(config, state.params, paths.join(workdir, "export"))
  _print(f"done: {total} steps in {_hms(time.time() - t0)}")
  return {"train": last, "eval": eval_metrics, "preempted": False, "step": max(start, total),
          "params": state.params, "evaluators": evaluators}


def export(config, params, path: str):
  """The inference model (online params + model config) for evaluate / pretrained / init_from.

  Every process takes part: orbax writes each host's shards of the (FSDP-sharded) params.
  """
  checkpoints.save_params(path, params, config.model, overwrite=True)
  if _is_main():
    checkpoints.save_assets(path, config)  # tokenizer + preprocessing.json beside the params
  _print(f"exported the model to {path}")


def _evaluate(evaluators, params, writer, step) -> dict:
  out = {}
  for ev in evaluators:
    res = ev.run(params)
    scalars = {k: float(v) for k, v in res.items() if isinstance(v, (int, float, np.floating))}
    writer.write(step, scalars, kind=ev.name)
    out.update({f"{ev.name}/{k}": v for k, v in scalars.items()})
    if ev.name == "retrieval":
      _print(f"eval step {step}: t2v R@1 {res['t2v_R1']:.1f} R@5 {res['t2v_R5']:.1f} "
             f"R@10 {res['t2v_R10']:.1f} MdR {res['t2v_MdR']:.1f} | v2t R@1 {res['v2t_R1']:.1f}")
  return out


def _keep_best(config, params, eval_metrics: dict, best: str | None, workdir: str, step: int):
  """Exports the model to WORKDIR/best when `best` (e.g. retrieval/t2v_R1) reaches a new high.

  Every process reads best.json and takes the same decision (the metrics are global), so all
  of them join the collective export; process 0 writes the record.
  """
  if not best or best not in eval_metrics:
    return
  record = paths.join(workdir, "best.json")
  previous = json.loads(paths.read_text(record)) if paths.exists(record) else None
  if previous is None or eval_metrics[best] > previous["value"]:
    export(config, params, paths.join(workdir, "best"))
    if _is_main():
      paths.write_text(record, json.dumps({
          "metric": best, "value": eval_metrics[best], "step": step,
          "selected_on": (f"val ({config.data.val})" if config.data.get("val")
                          else f"test ({config.data.eval}): no data.val given")}))
    checkpoints.sync("best_json")


def _maybe_init_from(config, state: TrainState, shardings) -> TrainState:
  """A new run's starting weights: `train.init_from` (an exported model, a training workdir or
  checkpoint — its online params only — or a released .pth) or `init.video` / `init.text`
  (timm ViT / CLIP, HF DistilBERT; see weights/public_init.py).

  Works on any number of hosts: the current params are gathered to every host, each host reads
  the whole source, and the merged params are placed onto the current shardings.
  """
  path = config.train.get("init_from", "")
  init = config.get("init")
  public = init is not None and (init.video or init.text)
  if (not path and not public) or int(jax.device_get(state.step)) > 0:
    return state
  from miles_jax.weights import public_init, torch_io
  merged = dict(_host_params(state.params))
  if path:
    if paths.isdir(path):
      merged = _orbax_init_params(path, config, merged)
    else:
      with paths.local_file(path) as local:
        merged.update(torch_io.convert_state_dict(torch_io.read_state_dict(local),
                                                  config.model)[0])
    _print(f"initialised params from {path}")
  if public:
    merged, report = public_init.apply_init(merged, config.model, init)
    _print(public_init.format_report(report))
  params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      merged, shardings.params)
  snapshot = {k: jax.tree.map(lambda x: x + 0, params[k]) for k in state.snapshot_params}
  return state.replace(params=params, snapshot_params=snapshot)


def _host_params(params):
  """Every param as a full numpy array on this host (FSDP spreads them over hosts)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def _orbax_init_params(path: str, config, current: dict) -> dict:
  """`current` with every param an orbax source holds: same architecture except the frame
  count; a shorter temporal table gets zero rows appended (as `convert --temporal_fill=zeros`)."""
  from flax import traverse_util
  source, saved_model = checkpoints.read_params_host(path)
  if saved_model is not None:
    wanted = json.loads(config.model.to_json_best_effort())
    # the frame count and the train-only MVM head's width (e.g. a pixel-target `mvm` stage) may
    # differ; the head then starts fresh (below)
    diffs = [d for d in checkpoints.diff_configs(saved_model, wanted)
             if not d.startswith(("model.video.num_frames:", "model.mvm_head_dim:"))]
    if diffs:
      raise checkpoints.ArchitectureMismatch(
          f"config.train.init_from={path} was written for another architecture:\n  "
          + "\n  ".join(diffs))
  flat_src = traverse_util.flatten_dict(source, sep="/")
  flat_cur = traverse_util.flatten_dict(current, sep="/")
  out, bad = dict(flat_cur), []
  for key, ref in flat_cur.items():
    if key not in flat_src:
      continue
    val = np.asarray(flat_src[key], np.float32).astype(np.asarray(ref).dtype)
    if key == "video/temporal_embed" and val.shape[0] < ref.shape[0]:
      val = np.concatenate([val, np.zeros((ref.shape[0] - val.shape[0],) + val.shape[1:],
                                          val.dtype)])
    if val.shape != ref.shape and key.startswith("mvm_head/"):
      # train-only (not in the retrieval model): e.g. a pixel-target stage's head before a
      # feature-target one
      _print(f"init_from: {key} has shape {val.shape} in {path}, {ref.shape} here (another "
             "MVM target): it starts fresh")
      continue
    if val.shape != ref.shape:
      bad.append(f"{key}: {val.shape} in the source, {ref.shape} in the model")
    out[key] = val
  if bad:
    raise checkpoints.ArchitectureMismatch(
        f"config.train.init_from={path}: shapes differ: " + "; ".join(bad))
  missing = sorted(set(flat_cur) - set(flat_src))
  if missing:
    _print(f"init_from: {len(missing)} params not in {path} keep their fresh values: "
           + ", ".join(missing[:8]))
  return traverse_util.unflatten_dict(out, sep="/")


def _check_same_model(saved_path: str, config):
  """Refuses to resume a workdir whose checkpoints were written for another architecture."""
  if not paths.exists(saved_path):
    return
  saved = json.loads(paths.read_text(saved_path)).get("model", {})
  diffs = checkpoints.diff_configs(saved, json.loads(config.model.to_json_best_effort()))
  if diffs:
    raise checkpoints.ArchitectureMismatch(
        f"--workdir={paths.dirname(saved_path)} holds checkpoints of another architecture:\n  "
        + "\n  ".join(diffs) + "\nuse a new --workdir, or the workdir's model settings")


def _check_batch(config, mesh, rules):
  div = parallel.batch_divisor(mesh, rules)
  b = int(config.data.batch_size)
  if b % div or b % jax.process_count():
    raise ValueError(f"data.batch_size={b} must be a multiple of the {div} batch shards of mesh "
                     f"{dict(mesh.shape)} and of the {jax.process_count()} processes")


def _fmt(m: dict) -> str:
  keys = ("loss", "contrastive_loss", "mvm_loss", "mac_loss", "lr", "grad_norm")
  return " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m and (m[k] or k in ("loss", "lr")))


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def read_metrics(workdir: str) -> list[dict]:
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def plot_curves(workdir: str, chance: dict | None = None) -> list[str]:
  """loss.png and recall.png (with dashed random-chance levels) from metrics.jsonl."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = read_metrics(workdir)
  written = []

  def figure(name, title, ylabel, draw):
    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    written.append(paths.join(workdir, name))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    paths.write_bytes(written[-1], buf.getvalue())

  def losses(ax):
    for k in ("loss", "contrastive_loss", "mvm_loss", "mac_loss"):
      pts = [(r["step"], r[k]) for r in train if r.get(k)]
      if pts:
        ax.plot(*zip(*pts), label=k)

  def recalls(ax):
    for k in ("t2v_R1", "t2v_R5", "t2v_R10", "v2t_R1"):
      line, = ax.plot([r["step"] for r in ev], [r[k] for r in ev], marker="o", label=k)
      if chance and k.startswith("t2v"):
        ax.axhline(chance[k], color=line.get_color(), linestyle="--", linewidth=0.8)
    if chance:
      ax.plot([], [], "k--", linewidth=0.8, label="random chance")

  train = [r for r in rows if r["kind"] == "train"]
  ev = [r for r in rows if r["kind"] == "retrieval"]
  if train:
    figure("loss.png", "training loss", "loss", losses)
  if ev:
    figure("recall.png", "held-out retrieval", "recall (%)", recalls)
  return written


def main_exit_code(fn) -> int:
  """Maps the loop's failures to exit codes with one clear line each."""
  try:
    fn()
    return 0
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except (ValueError, FileNotFoundError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

