r"""python -m miles_jax.embed --checkpoint=MODEL --videos=FOLDER|GLOB|LIST.txt --out=INDEX_DIR

Embeds every video of a folder (recursively), a glob or a list file (one path per line, relative
to the list's folder) into a searchable index, by the model's own eval protocol
(`preprocessing.json` of the export: the centre of each of T equal segments by Frozen's rule,
the centred square resized to the model's resolution, ImageNet normalisation). Videos are decoded by PyAV in
`--workers` processes; batches are split over this host's devices.

The index folder:
  index.json          model (checkpoint, fingerprint, config), protocol, inputs, shard layout;
                      `complete`, counts and the skipped files once finished
  files.txt           every input path, one per line (row = video id)
  shard-SSSSS-of-NNNNN.npz  `embeddings` float32 [n, P] (raw, un-normalised), `ids` int32 [n]
                      (rows of files.txt), `failed_ids`, `failed_errors`
  thumbs/IIIIIIII.jpg the sampled frames of video id I as one strip (for `search --html`)
  failed.txt          unreadable files, `path<TAB>error`

A killed run resumes: finished shards (written atomically) are not redone. Rerunning on an
index made by another model, file list, shard size or protocol is refused (exit 2) unless
--overwrite.
"""
from __future__ import annotations

from miles_jax.cli import setup_process

if __name__ == "__main__":  # before TensorFlow / jaxlib load: the log filter, path settings
  setup_process()

import collections
import glob
import hashlib
import json
import os
import sys
import time

import numpy as np

from miles_jax.data import readers

INDEX_FILE = "index.json"
FILES_FILE = "files.txt"
FAILED_FILE = "failed.txt"


class UsageError(ValueError):
  """Bad command-line input: reported as one line, exit code 2."""


class CorruptShard(UsageError):
  """An index shard that does not read back (truncated or damaged): one line naming it; a rerun
  of embed rebuilds it."""

  def __init__(self, path: str, err: Exception):
    super().__init__(f"{path} is truncated or corrupt ({type(err).__name__}: {err}): rerun "
                     "python -m miles_jax.embed with the same arguments to rebuild it")
    self.path = path


def read_shard(path: str) -> tuple:
  """(embeddings float32 [n, P], ids int32 [n], failed_ids, failed_errors) of one shard file;
  CorruptShard when it does not read back."""
  import zipfile
  try:
    with np.load(path) as z:
      out = (z["embeddings"], z["ids"], z["failed_ids"], z["failed_errors"])
  except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
    raise CorruptShard(path, e) from None
  if out[0].ndim != 2 or len(out[0]) != len(out[1]):
    raise CorruptShard(path, ValueError(f"embeddings {out[0].shape} for {len(out[1])} ids"))
  return out


def read_json(path: str, what: str) -> dict:
  """A JSON file of the index; a one-line UsageError naming it when it is not JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise UsageError(f"{path} is not valid JSON ({e}): {what}") from None


# Below these sizes a model is the demo's (configs/demo.py: a vocabulary of a few dozen words,
# 32-px frames), not one trained on real video.
DEMO_MAX_VOCAB, DEMO_MAX_IMG_SIZE = 1000, 64


def demo_model_note(model) -> str | None:
  """A one-line note when `model` is a tiny demo model whose rankings of real videos mean
  nothing (the export's tokenizer has < DEMO_MAX_VOCAB entries or its frames are <= 64 px)."""
  size = int(model.preprocessing.get("img_size", 0) or 0)
  vocab = 0
  path = getattr(model, "tokenizer_path", None)
  if path and str(path).endswith(".txt") and os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      vocab = sum(1 for _ in f)
  if not ((vocab and vocab < DEMO_MAX_VOCAB) or (size and size <= DEMO_MAX_IMG_SIZE)):
    return None
  what = ", ".join(x for x in (f"a {vocab}-token vocabulary" if vocab else "",
                               f"{size}-px frames" if size else "") if x)
  return (f"note: this is a tiny demo model ({what}): its results on real videos are not "
          "meaningful; for real search use the released MILES weights (README \"Converting "
          "and using the released weights\")")


# --- inputs ---------------------------------------------------------------------------------

def list_videos(spec: str) -> list:
  """A folder (recursive, video extensions), a list file or a glob -> sorted absolute paths."""
  if not spec:
    raise UsageError("--videos is required: a folder, a glob (quote it) or a list file")
  if os.path.isdir(spec):
    out = []
    for root, dirs, files in os.walk(spec):
      dirs.sort()
      out += [os.path.join(root, f) for f in files if f.lower().endswith(readers.VIDEO_EXTS)]
    if not out:
      raise UsageError(f"--videos={spec}: the folder holds no video files "
                       f"({', '.join(readers.VIDEO_EXTS)})")
  elif os.path.isfile(spec) and not spec.lower().endswith(readers.VIDEO_EXTS):
    base = os.path.dirname(os.path.abspath(spec))
    with open(spec) as f:
      out = [os.path.join(base, line.strip()) for line in f
             if line.strip() and not line.startswith("#")]
    if not out:
      raise UsageError(f"--videos={spec}: the list file names no videos")
  else:
    out = glob.glob(spec, recursive=True)
    if not out:
      raise UsageError(f"--videos={spec}: no file matches (a folder, a glob or a list file)")
  return sorted(os.path.abspath(p) for p in out)


def shard_name(i: int, n: int) -> str:
  return f"shard-{i:05d}-of-{n:05d}.npz"


def thumb_path(index_dir: str, vid: int) -> str:
  return os.path.join(index_dir, "thumbs", f"{vid:08d}.jpg")


def _files_hash(paths: list) -> str:
  return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]


# --- reading an index -------------------------------------------------------------------------

class Index:
  """A (possibly partial) index folder: metadata, paths, and its shards read one at a time."""

  def __init__(self, directory: str):
    self.dir = directory
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"--index={directory} is not an index (no {INDEX_FILE}); build one "
                              "with python -m miles_jax.embed")
    self.meta = read_json(path, "rebuild the index with python -m miles_jax.embed --overwrite")
    with open(os.path.join(directory, FILES_FILE)) as f:
      self.paths = [line.rstrip("\n") for line in f]

  def shard_files(self) -> list:
    n = self.meta["num_shards"]
    return [os.path.join(self.dir, shard_name(i, n)) for i in range(n)
            if os.path.exists(os.path.join(self.dir, shard_name(i, n)))]

  def shards(self):
    """Yields (embeddings float32 [n, P], ids int32 [n]) per finished shard, in order."""
    for f in self.shard_files():
      emb, ids, _, _ = read_shard(f)
      yield emb, ids

  def ids(self) -> np.ndarray:
    parts = [ids for _, ids in self.shards()]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)

  def embeddings(self) -> np.ndarray:
    parts = [e for e, _ in self.shards()]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

  def thumb(self, vid: int) -> str | None:
    p = thumb_path(self.dir, vid)
    return p if os.path.exists(p) else None


# --- building an index ------------------------------------------------------------------------

def _check_or_start(out: str, meta: dict, paths: list, overwrite: bool) -> None:
  index_file = os.path.join(out, INDEX_FILE)
  if os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--out={out} is a file: give a folder for the index (it is created)")
  if os.path.exists(index_file) and not overwrite:
    old = read_json(index_file, "pass --overwrite to rebuild the index, or another --out")
    keys = {"model fingerprint": ("model", "fingerprint"), "file list": ("inputs", "files_hash"),
            "shard size": ("shard_size",), "protocol": ("protocol",)}
    for what, key in keys.items():
      a, b = old, meta
      for k in key:
        a, b = a.get(k) if isinstance(a, dict) else None, b.get(k) if isinstance(b, dict) else None
      if a != b:
        raise UsageError(f"--out={out} holds an index with another {what} ({a!r}, now {b!r}): "
                         "pass --overwrite to rebuild it, or another --out")
    return
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise UsageError(f"--out={out} exists, is not empty and is no index: choose another --out "
                     "or pass --overwrite")
  if overwrite and os.path.isdir(out):
    import shutil
    for name in os.listdir(out):  # only what an index holds
      p = os.path.join(out, name)
      if name in (INDEX_FILE, FILES_FILE, FAILED_FILE) or name.startswith("shard-"):
        os.remove(p)
      elif name == "thumbs":
        shutil.rmtree(p)
  os.makedirs(os.path.join(out, "thumbs"), exist_ok=True)
  _write_text(os.path.join(out, FILES_FILE), "".join(p + "\n" for p in paths))
  _write_json(index_file, meta)


def _write_text(path: str, text: str):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _write_json(path: str, obj):
  _write_text(path, json.dumps(obj, indent=2))


def _write_bytes(path: str, data: bytes):
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def build_index(model, videos: str, out: str, *, checkpoint: str = "", shard_size: int = 256,
                batch_size: int = 16, workers: int = 0, thumb_height: int = 96,
                overwrite: bool = False, progress: bool = True, max_shards: int = 0) -> dict:
  """Embeds `videos` (folder / glob / list file) with `model` (a `pretrained.Pretrained`) into
  the index folder `out`; returns the final index.json content. `max_shards` > 0 stops after
  that many new shards (tests: a run cut short, as a kill would)."""
  import concurrent.futures as cf
  import multiprocessing as mp

  from miles_jax.data import prepare

  if shard_size < 1 or batch_size < 1:
    raise UsageError("--shard_size and --batch_size must be >= 1")
  paths = list_videos(videos)
  num_shards = -(-len(paths) // shard_size)
  pre = model.preprocessing
  meta = {
      "format": "miles_jax embedding index v1",
      "model": {"checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
                "fingerprint": model.fingerprint(), "config": model.config.to_dict()},
      "protocol": pre,
      "inputs": {"videos": videos, "num_videos": len(paths), "files_hash": _files_hash(paths)},
      "shard_size": shard_size, "num_shards": num_shards, "thumb_height": thumb_height,
      "embedding_dim": int(model.config.proj_dim), "normalised": False, "complete": False,
  }
  _check_or_start(out, meta, paths, overwrite)
  for i in range(num_shards):  # a shard that does not read back is redone
    f = os.path.join(out, shard_name(i, num_shards))
    if os.path.exists(f):
      try:
        read_shard(f)
      except CorruptShard as e:
        print(f"note: {e.path} does not read back: rebuilding it", file=sys.stderr)
        os.remove(f)
  todo = [i for i in range(num_shards)
          if not os.path.exists(os.path.join(out, shard_name(i, num_shards)))]
  if max_shards > 0:
    todo = todo[:max_shards]
  finished = [i for i in range(num_shards)
              if os.path.exists(os.path.join(out, shard_name(i, num_shards)))]
  done_before = sum(min(shard_size, len(paths) - i * shard_size) for i in finished)
  tasks = [(i, vid) for i in todo for vid in range(i * shard_size,
                                                   min((i + 1) * shard_size, len(paths)))]
  t, size = int(pre["num_frames"]), int(pre["img_size"])
  workers = workers or max(1, (os.cpu_count() or 2))
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(paths), initial=done_before, unit="clip", desc="embed",
               file=sys.stderr, dynamic_ncols=True)
  t0, embedded = time.time(), 0
  by_shard = collections.defaultdict(list)
  remaining = collections.Counter(i for i, _ in tasks)
  ctx = mp.get_context("spawn")  # no fork of a process holding JAX's threads
  with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_ignore_sigint) as pool:
    window = collections.deque()
    it = iter(tasks)
    limit = workers * 2 + batch_size

    def fill():
      for shard, vid in it:
        window.append((shard, vid, pool.submit(prepare.embed_task,
                                               (paths[vid], t, size, thumb_height))))
        if len(window) >= limit:
          break

    fill()
    pending_batch = []  # (shard, vid, frames)

    def flush(batch):
      if not batch:
        return
      emb = model.encode_clips(np.stack([f for _, _, f in batch]))
      for (shard, vid, _), e in zip(batch, emb):
        by_shard[shard].append((vid, e, None))

    try:
      while window:
        shard, vid, fut = window.popleft()
        frames, jpeg, err = fut.result()
        fill()
        if err is None:
          _write_bytes(thumb_path(out, vid), jpeg)
          pending_batch.append((shard, vid, frames))
        else:
          by_shard[shard].append((vid, None, err))
        remaining[shard] -= 1
        if len(pending_batch) >= batch_size or remaining[shard] == 0:
          flush(pending_batch)
          embedded += len(pending_batch)
          pending_batch = []
        if remaining[shard] == 0:
          _finish_shard(out, shard, num_shards, by_shard.pop(shard), meta["embedding_dim"])
        if bar is not None:
          bar.update(1)
    except KeyboardInterrupt:
      pool.shutdown(wait=False, cancel_futures=True)  # finished shards stay; a rerun resumes
      raise
  if bar is not None:
    bar.close()
  seconds = time.time() - t0
  return _finalise(out, meta, paths, embedded, seconds)


def _ignore_sigint():
  """Decoding workers leave Ctrl-C to the main process (which reports and exits)."""
  import signal
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def progress_line(out: str) -> str:
  """'N of M shards done' of the index folder `out` (for the Ctrl-C message)."""
  try:
    meta = read_json(os.path.join(out, INDEX_FILE), "")
    n = int(meta["num_shards"])
  except (OSError, UsageError, KeyError, ValueError):
    return "0 shards done"
  done = sum(os.path.exists(os.path.join(out, shard_name(i, n))) for i in range(n))
  return f"{done} of {n} shards done"


def _finish_shard(out: str, shard: int, num_shards: int, rows: list, dim: int):
  ok = [(v, e) for v, e, err in rows if err is None]
  bad = [(v, err) for v, _, err in rows if err is not None]
  path = os.path.join(out, shard_name(shard, num_shards))
  tmp = path + ".tmp.npz"
  np.savez(tmp,
           embeddings=np.asarray([e for _, e in ok], np.float32).reshape(len(ok), dim),
           ids=np.asarray([v for v, _ in ok], np.int32),
           failed_ids=np.asarray([v for v, _ in bad], np.int32),
           failed_errors=np.asarray([e for _, e in bad], dtype=str))
  os.replace(tmp, path)


def _finalise(out: str, meta: dict, paths: list, embedded: int, seconds: float) -> dict:
  n = meta["num_shards"]
  failed, count, finished = [], 0, 0
  for i in range(n):
    f = os.path.join(out, shard_name(i, n))
    if not os.path.exists(f):
      continue
    finished += 1
    _, ids, failed_ids, failed_errors = read_shard(f)
    count += len(ids)
    failed += [{"path": paths[int(v)], "error": str(e)}
               for v, e in zip(failed_ids, failed_errors)]
  meta = dict(meta, complete=finished == n, num_embedded=count, num_failed=len(failed),
              failed=failed[:1000],
              last_run={"clips": embedded, "seconds": round(seconds, 2),
                        "clips_per_s": round(embedded / seconds, 3) if seconds > 0 else None})
  _write_json(os.path.join(out, INDEX_FILE), meta)
  _write_text(os.path.join(out, FAILED_FILE),
              "".join(f"{d['path']}\t{d['error']}\n" for d in failed))
  return meta


# --- command line ---------------------------------------------------------------------------

def load_model(checkpoint: str, config=None, tokenizer: str | None = None):
  from miles_jax import pretrained
  if not checkpoint:
    raise UsageError("--checkpoint is required: an exported model folder (WORKDIR/export, "
                     "WORKDIR/best, convert --out) or a .pth/.safetensors with --config")
  if not os.path.exists(checkpoint):
    raise UsageError(f"--checkpoint={checkpoint} does not exist")
  return pretrained.load(checkpoint, config, tokenizer=tokenizer or None)


def main(argv):
  from absl import flags
  f = flags.FLAGS
  try:
    if not f.out:
      raise UsageError("--out (the index folder) is required")
    paths = list_videos(f.videos)  # fail on bad --videos before loading a model
    del paths
    if os.path.exists(f.out) and not os.path.isdir(f.out):
      raise UsageError(f"--out={f.out} is a file: give a folder for the index (it is created)")
    model = load_model(f.checkpoint, f.config if not os.path.isdir(f.checkpoint or "") else None)
    note = demo_model_note(model)
    if note:
      print(note, file=sys.stderr)
    meta = build_index(model, f.videos, f.out, checkpoint=f.checkpoint,
                       shard_size=f.shard_size, batch_size=f.batch_size, workers=f.workers,
                       thumb_height=f.thumb_height, overwrite=f.overwrite,
                       progress=not f.no_progress)
  except (UsageError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"\ninterrupted: {progress_line(f.out)}; run the same command to resume",
          file=sys.stderr)
    return 130
  rate = meta["last_run"]["clips_per_s"]
  print(f"index: {f.out}: {meta['num_embedded']} videos embedded, {meta['num_failed']} skipped"
        + (f" (listed in {os.path.join(f.out, FAILED_FILE)})" if meta["num_failed"] else "")
        + f"; this run {meta['last_run']['clips']} clips in {meta['last_run']['seconds']:.1f} s"
        + (f" = {rate:.2f} clips/s" if rate else ""))
  return 0


def cli():
  from absl import flags

  from miles_jax import cli as cli_lib
  cli_lib.define_config_file(
      "config", None, "Only for a .pth/.safetensors --checkpoint: the config whose model and "
      "data (num_frames, max_len) sections describe it.")
  flags.DEFINE_string("checkpoint", None, "Exported model folder (WORKDIR/export, WORKDIR/best, "
                      "convert --out) or a PyTorch .pth/.safetensors (with --config).")
  flags.DEFINE_string("videos", None, "A folder (searched recursively), a glob such as "
                      "'clips/**/*.mp4' (quoted) or a text file listing one video per line.")
  flags.DEFINE_string("out", None, "The index folder (created; rerun to resume).")
  flags.DEFINE_integer("shard_size", 256, "Videos per index shard (the unit of resumption).")
  flags.DEFINE_integer("batch_size", 16, "Clips per model call (split over local devices).")
  flags.DEFINE_integer("workers", 0, "Decoding processes (0: one per CPU core).")
  flags.DEFINE_integer("thumb_height", 96, "Height in pixels of the thumbnail frames.")
  flags.DEFINE_bool("overwrite", False, "Rebuild --out even if it holds another index.")
  flags.DEFINE_bool("no_progress", False, "No progress bar.")
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
