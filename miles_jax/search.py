r"""python -m miles_jax.search --index=INDEX_DIR --query="a dog runs" [--query=...] [--k=10]
                            [--html=results.html]

Text -> video search over an index built by `python -m miles_jax.embed`: each query is encoded
with the index's own model (its checkpoint recorded in index.json, fingerprint checked), the
index is searched shard by shard (chunked cosine top-k, evaluation/search.py), and the top-k are
printed with their scores. `--html` writes a static page (thumbnail strips of the sampled frames,
scores, file names) that opens from the file system with no server and no network.
`--query_video=FILE` searches by an example clip instead of a sentence.
"""
from __future__ import annotations

from miles_jax.cli import setup_process

if __name__ == "__main__":  # before TensorFlow / jaxlib load: the log filter, path settings
  setup_process()

import os
import sys

import numpy as np


def unknown_words(model, query: str) -> tuple:
  """(words of `query`, those the model's tokenizer maps only to [UNK]). Words are split as
  BERT's basic tokenizer does (runs of letters/digits, each punctuation mark, each CJK
  character). Only a WordPiece vocab.txt can tell; a sentencepiece model has no unknown words
  here."""
  import re
  words = re.findall(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+|[^\w\s]", query.lower())
  path = str(getattr(model, "tokenizer_path", "") or "")
  if not words or not path.endswith(".txt"):
    return words, []
  with open(path, encoding="utf-8") as f:
    vocab = [line.rstrip("\n") for line in f]
  unk = vocab.index("[UNK]") if "[UNK]" in vocab else -1
  ids, att = model.tokenizer.tokenize_numpy(words)
  special = {model.tokenizer.bos_id, model.tokenizer.eos_id, model.tokenizer.pad_id}
  unknown = []
  for w, row, m in zip(words, ids, att):
    pieces = [int(i) for i, a in zip(row, m) if a and int(i) not in special]
    if not pieces or all(i == unk for i in pieces):
      unknown.append(w)
  return words, unknown


def check_queries(model, queries: list) -> list:
  """Refuses (UsageError) an empty or whitespace-only query and one whose words are all outside
  the model's vocabulary; returns a warning line per query with some unknown words."""
  from miles_jax import embed
  notes = []
  for q in queries:
    if not q.strip():
      raise embed.UsageError(f"--query={q!r} is empty: give a sentence, e.g. --query=\"a dog "
                             "runs on a beach\"")
    words, unknown = unknown_words(model, q)
    shown = ", ".join(dict.fromkeys(unknown))
    if words and len(unknown) == len(words):
      raise embed.UsageError(
          f"--query={q!r}: none of its words are in the model's vocabulary ({shown}), so it "
          "would rank videos at random; use words the model was trained on")
    if unknown:
      notes.append(f"warning: --query={q!r}: unknown to the model, ignored: {shown}")
  return notes


def search(index, model, queries: list, query_videos: list, k: int):
  """-> [(query label, scores [k'], video ids [k'])] for text queries then video queries."""
  from miles_jax.evaluation import search as search_lib
  labels, emb = [], []
  if queries:
    labels += list(queries)
    emb.append(model.encode_texts(queries))
  if query_videos:
    labels += [f"[video] {os.path.basename(p)}" for p in query_videos]
    emb.append(model.encode_video_files(query_videos))
  vals, ids = search_lib.search_shards(np.concatenate(emb), index.shards(), k)
  return [(labels[i], vals[i], ids[i]) for i in range(len(labels))]


def format_results(index, results) -> str:
  lines = []
  for label, vals, ids in results:
    lines.append(f"query: {label}")
    for r, (s, v) in enumerate(zip(vals, ids)):
      lines.append(f"  {r + 1:3d}  {s:7.4f}  {index.paths[int(v)]}")
  return "\n".join(lines)


def write_html(index, results, out: str) -> str:
  from miles_jax import gallery
  queries = []
  for label, vals, ids in results:
    rows = []
    for r, (s, v) in enumerate(zip(vals, ids)):
      thumb = index.thumb(int(v))
      if thumb is None:
        continue
      with open(thumb, "rb") as f:
        jpeg = f.read()
      path = index.paths[int(v)]
      rows.append({"rank": r + 1, "score": float(s), "name": os.path.basename(path),
                   "title": path, "jpeg": jpeg})
    queries.append({"query": label, "results": rows})
  meta = index.meta
  sub = (f"index {os.path.abspath(index.dir)}: {meta.get('num_embedded', '?')} videos, model "
         f"{meta['model']['fingerprint']}, {meta['protocol']['num_frames']} frames per clip "
         "(middle of equal segments); scores are cosine similarities")
  return gallery.write_page(out, "Video search results", queries, sub,
                            frames_per_clip=int(meta["protocol"]["num_frames"]),
                            thumb_height=int(meta.get("thumb_height", 96)))


def main(argv):
  from absl import flags

  from miles_jax import embed
  f = flags.FLAGS
  try:
    if not f.index:
      raise embed.UsageError("--index is required (a folder written by python -m miles_jax.embed)")
    if not (f.query or f.query_video):
      raise embed.UsageError("give at least one --query=\"...\" (or --query_video=FILE)")
    if f.k < 1:
      raise embed.UsageError(f"--k={f.k} must be >= 1")
    index = embed.Index(f.index)
    if not index.shard_files():
      raise embed.UsageError(f"--index={f.index} has no finished shard yet: run embed first")
    checkpoint = f.checkpoint or index.meta["model"]["checkpoint"]
    if not checkpoint:
      raise embed.UsageError("the index records no checkpoint: pass --checkpoint")
    config = None
    if not os.path.isdir(checkpoint):  # a .pth: the index records the model config it used
      import ml_collections
      config = ml_collections.ConfigDict(index.meta["model"]["config"])
    model = embed.load_model(checkpoint, config, f.tokenizer)
    if f.query:
      for note in check_queries(model, list(f.query)):
        print(note, file=sys.stderr)
    note = embed.demo_model_note(model)
    if note:
      print(note, file=sys.stderr)
    if model.fingerprint() != index.meta["model"]["fingerprint"]:
      raise embed.UsageError(
          f"--checkpoint={checkpoint} (fingerprint {model.fingerprint()}) is not the model "
          f"that built --index={f.index} ({index.meta['model']['fingerprint']}): search with "
          "that model, or rebuild the index with python -m miles_jax.embed --overwrite")
    results = search(index, model, list(f.query or []), list(f.query_video or []), f.k)
  except (embed.UsageError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("\ninterrupted: no results written", file=sys.stderr)
    return 130
  if not index.meta.get("complete"):
    print(f"note: {f.index} is partial ({len(index.shard_files())} of "
          f"{index.meta['num_shards']} shards): rerun embed to finish it", file=sys.stderr)
  print(format_results(index, results))
  if f.html:
    if os.path.isdir(f.html):
      print(f"error: --html={f.html} is a folder: give a file name, e.g. {f.html}/results.html",
            file=sys.stderr)
      return 2
    print(f"page: {write_html(index, results, f.html)}")
  return 0


def cli():
  from absl import flags

  from miles_jax import cli as cli_lib
  flags.DEFINE_string("index", None, "Index folder written by python -m miles_jax.embed.")
  flags.DEFINE_multi_string("query", None, "A sentence to search for (repeat for several).")
  flags.DEFINE_multi_string("query_video", None, "A video file to search by (repeatable).")
  flags.DEFINE_integer("k", 10, "Results per query.")
  flags.DEFINE_string("html", None, "Also write a static results page here (e.g. results.html).")
  flags.DEFINE_string("checkpoint", None, "Model to encode the queries (default: the index's).")
  flags.DEFINE_string("tokenizer", None, "vocab.txt / sentencepiece .model when the model "
                      "carries none (a .pth).")
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
