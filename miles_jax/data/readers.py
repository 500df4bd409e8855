"""Readers of each dataset's published annotation layout -> a list of `Item`s.

A reader only parses annotations and points at media files; it never opens media. Rows whose
file is missing or whose caption is empty are still returned: `prepare` skips and reports them.
Ids of a `video_list` that have no annotation are never dropped silently: readers append them
to the `missing` list they are given, and `prepare` refuses to run (exit 2) unless
`--allow_missing`, recording the count in report.json either way.

Layouts are those of the files people download (the upstream loaders were read for them):
Frozen-in-Time's `MSR_VTT.json` + `high-quality/structured-symlinks/*_list*.txt`, CLIP4Clip's
`MSRVTT_data.json` + `MSRVTT_train.9k.csv` / `MSRVTT_JSFUSION_test.csv`, MSVD/LSMDC
`raw-captions.pkl` + `{train,val,test}_list.txt` (collaborative-experts), LSMDC16 tab-separated
csvs, DiDeMo `{train,val,test}_data.json` + lists, CC3M tsv and img2dataset's output folders.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import pickle
import re
from typing import Callable, Iterable, Optional

from miles_jax import paths

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".flv", ".mpg", ".3gp")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass
class Item:
  video_id: str
  path: str  # a file, or `ARCHIVE.tar::MEMBER` for a webdataset tar member
  captions: list
  label: int = -1
  is_image: bool = False
  max_seconds: float = 0.0  # > 0: frames are taken only from [0, max_seconds) of the source


TAR_SEP = "::"


def media_exists(path: str) -> bool:
  """A file, or a member of a tar (`ARCHIVE.tar::MEMBER`); a URI (gs://...) through the path
  layer."""
  if TAR_SEP not in path and paths.is_uri(path):
    return paths.exists(path)
  if TAR_SEP in path:
    import tarfile
    archive, member = path.split(TAR_SEP, 1)
    if not os.path.isfile(archive):
      return False
    with tarfile.open(archive) as tf:
      try:
        tf.getmember(member)
        return True
      except KeyError:
        return False
  return os.path.isfile(path)


@contextlib.contextmanager
def local_media(path: str):
  """Yields a local file path for `path` (a tar member is extracted to a temporary file; a
  URI such as gs://... is copied to one)."""
  if TAR_SEP not in path:
    with paths.local_file(path) as local:
      yield local
    return
  import tarfile
  import tempfile
  archive, member = path.split(TAR_SEP, 1)
  with tarfile.open(archive) as tf, tempfile.NamedTemporaryFile(
      suffix=os.path.splitext(member)[1]) as tmp:
    tmp.write(tf.extractfile(member).read())
    tmp.flush()
    yield tmp.name


# Globals a dataset pickle (raw-captions.pkl, jsfusion_val_caption_idx.pkl) may reference:
# plain containers and numpy scalars/arrays. Anything else is refused, never imported or called.
_PICKLE_SAFE = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "int",
                              "float", "bool", "bytes", "complex")
} | {("collections", "OrderedDict"), ("collections", "defaultdict")} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    for n in ("scalar", "_reconstruct")} | {("numpy", "dtype"), ("numpy", "ndarray")}


class _PlainUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if (module, name) not in _PICKLE_SAFE:
      raise pickle.UnpicklingError(f"global {module}.{name} is not a plain container")
    import importlib
    if module.startswith("numpy"):
      import numpy  # noqa: F401  (numpy.core is an alias of numpy._core on numpy 2)
    return getattr(importlib.import_module(module), name)


def load_plain_pickle(path: str):
  """A pickle of containers / numpy values only (e.g. raw-captions.pkl); refuses anything else."""
  with open(path, "rb") as f:
    try:
      return _PlainUnpickler(f).load()
    except pickle.UnpicklingError as e:
      raise ValueError(f"{path}: refused to unpickle ({e}); expected plain data") from None


def find_media(media_dir: str, stem: str, exts: Iterable[str] = VIDEO_EXTS,
               subdirs: Iterable[str] = ("",)) -> str:
  """First existing `media_dir/sub/stem[.ext]`; the first candidate if none exists."""
  candidates = []
  for sub in subdirs:
    base = os.path.join(media_dir, sub, stem)
    if os.path.splitext(stem)[1].lower() in tuple(exts):
      candidates.append(base)
    candidates += [base + e for e in exts]
  for c in candidates:
    if os.path.isfile(c):
      return c
  return candidates[0]


def read_video_list(path: str) -> list:
  """Video ids of a split file, in file order: one id per line (Frozen's / collaborative-experts'
  `*_list*.txt`, extension dropped) or a csv with a `video_id` column (CLIP4Clip's
  `MSRVTT_train.9k.csv`)."""
  with open(path, newline="") as f:
    lines = [line.strip() for line in f if line.strip()]
  if lines and path.endswith(".csv"):
    rows = list(csv.DictReader(lines))
    if not rows or "video_id" not in rows[0]:
      raise ValueError(f"--video_list={path}: a csv video list needs a 'video_id' column "
                       f"(header: {lines[0]!r})")
    ids = [r["video_id"].strip() for r in rows]
  else:
    ids = [line.split()[0] for line in lines]
  return list(dict.fromkeys(os.path.splitext(i)[0] if i.endswith(VIDEO_EXTS) else i
                            for i in ids))


def _select(items: list, video_list: Optional[str], missing: Optional[list]) -> list:
  """Items of `video_list` in its order; listed ids without annotations go to `missing`."""
  if not video_list:
    return items
  by_id = {it.video_id: it for it in items}
  wanted = read_video_list(video_list)
  lost = [v for v in wanted if v not in by_id]
  if missing is not None:
    missing.extend(lost)
  return [by_id[v] for v in wanted if v in by_id]


def _group(pairs: Iterable[tuple], media: Callable[[str], str]) -> list:
  """(video_id, caption) rows -> one Item per video, captions in file order."""
  items: dict = {}
  for vid, cap in pairs:
    if vid not in items:
      items[vid] = Item(vid, media(vid), [])
    if cap and cap.strip():
      items[vid].captions.append(cap.strip())
  return list(items.values())


def read_csv(annotations: str, media_dir: str, **_) -> list:
  """Generic `video_path,caption[,label]` (header optional); rows of one path merge captions."""
  with open(annotations, newline="") as f:
    rows = list(csv.reader(f))
  if rows and [c.strip().lower() for c in rows[0][:2]] == ["video_path", "caption"]:
    rows = rows[1:]
  items: dict = {}
  for i, row in enumerate(rows):
    if not row:
      continue
    if len(row) < 2:
      raise ValueError(f"{annotations}:{i + 1}: expected video_path,caption[,label], got {row}")
    path = row[0].strip()
    if path not in items:
      full = path if os.path.isabs(path) else os.path.join(media_dir, path)
      label = int(row[2]) if len(row) > 2 and row[2].strip() else -1
      items[path] = Item(path, full, [], label, full.lower().endswith(IMAGE_EXTS))
    if row[1].strip():
      items[path].captions.append(row[1].strip())
  return list(items.values())


def read_webvid(annotations: str, media_dir: str, **_) -> list:
  """WebVid csv (videoid, contentUrl, duration, page_dir, name); media at [page_dir/]videoid.*"""
  items = []
  with open(annotations, newline="") as f:
    for row in csv.DictReader(f):
      vid = str(row["videoid"]).strip()
      path = find_media(media_dir, vid, subdirs=(row.get("page_dir", "") or "", ""))
      cap = (row.get("name") or "").strip()
      items.append(Item(vid, path, [cap] if cap else []))
  return items


def read_cc3m(annotations: str, media_dir: str, **_) -> list:
  """CC3M tsv `caption<TAB>url` (Google's file has no header; img2dataset's recipe adds the line
  `caption<TAB>url`, which is skipped). Data row i (0-based, header excluded) is img2dataset's
  key {i:09d}: looked up in its `files` layout `media_dir/{i // 10000:05d}/{i:09d}.jpg`
  (default 10,000 per shard), then `media_dir/{i:09d}.jpg`, then `media_dir/{i}.jpg`.
  For any other shard size, or webdataset tars, use --format img2dataset on the output folder."""
  items = []
  with open(annotations, newline="") as f:
    rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
  if rows and [c.strip().lower() for c in rows[0][:2]] == ["caption", "url"]:
    rows = rows[1:]
  for i, row in enumerate(rows):
    key = f"{i:09d}"
    path = find_media(media_dir, key, IMAGE_EXTS, subdirs=(f"{i // 10000:05d}", ""))
    if not os.path.isfile(path):
      path = find_media(media_dir, str(i), IMAGE_EXTS)
    cap = row[0].strip()
    items.append(Item(key, path, [cap] if cap else [], is_image=True))
  return items


def read_img2dataset(annotations: str, media_dir: str = "", **_) -> list:
  """img2dataset's output folder (e.g. CC3M by its dataset_examples/cc3m.md recipe): `files`
  output (`{shard:05d}/{key}.jpg` + `{key}.txt` caption) or `webdataset` output
  (`{shard:05d}.tar` with members `{key}.jpg` + `{key}.txt`). Captions come from the .txt files
  img2dataset wrote beside each image, so no row arithmetic is involved."""
  import tarfile
  folder = annotations
  items = []
  for name in sorted(os.listdir(folder)):
    full = os.path.join(folder, name)
    if name.endswith(".tar") and os.path.isfile(full):
      with tarfile.open(full) as tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        for mname in sorted(members):
          key, ext = os.path.splitext(mname)
          if ext.lower() not in IMAGE_EXTS:
            continue
          txt = members.get(key + ".txt")
          cap = tf.extractfile(txt).read().decode("utf-8").strip() if txt else ""
          items.append(Item(os.path.basename(key), full + TAR_SEP + mname, [cap] if cap else [],
                            is_image=True))
    elif os.path.isdir(full):
      for fname in sorted(os.listdir(full)):
        key, ext = os.path.splitext(fname)
        if ext.lower() not in IMAGE_EXTS:
          continue
        txt = os.path.join(full, key + ".txt")
        cap = open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else ""
        items.append(Item(key, os.path.join(full, fname), [cap] if cap else [], is_image=True))
  if not items:
    raise ValueError(f"--annotations={folder}: no img2dataset output found (shard folders "
                     "NNNNN/ with KEY.jpg + KEY.txt, or NNNNN.tar webdataset shards)")
  return items


def read_msrvtt(annotations: str, media_dir: str, video_list: Optional[str] = None,
                missing: Optional[list] = None, caption_index: Optional[str] = None,
                **_) -> list:
  """MSR-VTT, any of the published annotation files:
  - `MSRVTT_JSFUSION_test.csv` (key, vid_key, video_id, sentence): the 1k-A test pairs;
  - CLIP4Clip's `MSRVTT_data.json` / the original `train_val_videodatainfo.json`
    (`sentences`: [{video_id, caption}]);
  - Frozen-in-Time's `MSR_VTT.json` (`annotations`: [{image_id, caption}]).
  `video_list`: Frozen's split file (`train_list_jsfusion.txt`, `val_list_jsfusion.txt`, ...) or
  CLIP4Clip's `MSRVTT_train.9k.csv`. `caption_index`: Frozen's `jsfusion_val_caption_idx.pkl`
  ({video_id: index}) keeps that one caption per video, as Frozen's 1k-A test does.
  """
  media = lambda vid: find_media(media_dir, vid)
  if annotations.endswith(".csv"):
    with open(annotations, newline="") as f:
      reader = csv.DictReader(f)
      cols = reader.fieldnames or []
      if "sentence" not in cols or "video_id" not in cols:
        raise ValueError(
            f"--annotations={annotations}: columns {cols} are not MSRVTT_JSFUSION_test.csv's "
            "(key, vid_key, video_id, sentence). A csv with only video ids (MSRVTT_train.9k.csv) "
            "is a split: pass it as --video_list with --annotations=MSRVTT_data.json")
      rows = [(r["video_id"].strip(), r["sentence"]) for r in reader]
  else:
    with open(annotations) as f:
      data = json.load(f)
    if isinstance(data, dict) and "sentences" in data:
      rows = [(s["video_id"], s["caption"]) for s in data["sentences"]]
    elif isinstance(data, dict) and "annotations" in data:  # Frozen's MSR_VTT.json
      rows = [(a["image_id"], a["caption"]) for a in data["annotations"]]
    else:
      keys = sorted(data) if isinstance(data, dict) else type(data).__name__
      raise ValueError(f"--annotations={annotations}: expected a 'sentences' (MSRVTT_data.json) "
                       f"or 'annotations' (Frozen's MSR_VTT.json) list, found {keys}")
  items = _select(_group(rows, media), video_list, missing)
  if caption_index:
    index = load_plain_pickle(caption_index)
    for it in items:
      if it.video_id not in index:
        raise ValueError(f"--caption_index={caption_index}: no entry for {it.video_id}")
      it.captions = [it.captions[int(index[it.video_id])]]
  return items


def _raw_captions(path: str) -> dict:
  """collaborative-experts' `raw-captions.pkl`: {video_id: [[token, ...], ...]} -> sentences."""
  data = load_plain_pickle(path)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a dict video_id -> list of token lists")
  return {str(k): [" ".join(c) if isinstance(c, (list, tuple)) else str(c)
                   for c in caps if c is not None] for k, caps in data.items()}


def read_msvd(annotations: str, media_dir: str, video_list: Optional[str] = None,
              missing: Optional[list] = None, **_) -> list:
  """MSVD: `raw-captions.pkl` (with `--video_list` train_list.txt / test_list.txt, as CLIP4Clip
  and collaborative-experts ship it; captions = tokens joined by spaces) or
  AllVideoDescriptions.txt (`vid caption words` per line, '#' comments, many per vid)."""
  media = lambda vid: find_media(media_dir, vid)
  if annotations.endswith(".pkl"):
    rows = [(vid, cap) for vid, caps in _raw_captions(annotations).items() for cap in caps]
  else:
    rows = []
    with open(annotations) as f:
      for line in f:
        line = line.strip()
        if not line or line.startswith("#"):
          continue
        vid, _, cap = line.partition(" ")
        rows.append((vid, cap))
  return _select(_group(rows, media), video_list, missing)


def read_lsmdc(annotations: str, media_dir: str, video_list: Optional[str] = None,
               missing: Optional[list] = None, **_) -> list:
  """LSMDC16 tab-separated files (`LSMDC16_annos_{training,val,test}.csv`, and the 1,000-clip
  test `LSMDC16_challenge_1000_publictect.csv`): CLIP_ID, START_ALIGNED, END_ALIGNED,
  START_EXTRACTED, END_EXTRACTED, SENTENCE per line; a clip id may repeat (its sentences are
  merged). Or Frozen's `raw-captions.pkl` with `--video_list`. Clips at [movie/]clip_id.avi."""
  media = lambda clip: find_media(media_dir, clip, subdirs=(clip.rsplit("_", 1)[0], ""))
  if annotations.endswith(".pkl"):
    rows = [(vid, cap) for vid, caps in _raw_captions(annotations).items() for cap in caps]
    return _select(_group(rows, media), video_list, missing)
  rows = []
  with open(annotations, newline="") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      cols = line.split("\t")
      if len(cols) != 6:
        raise ValueError(f"{annotations}:{n}: expected 6 tab-separated columns (clip id, 4 "
                         f"times, sentence), got {len(cols)}")
      rows.append((cols[0].strip(), cols[5]))
  return _select(_group(rows, media), video_list, missing)


# CLIP4Clip's DiDeMo window: start 0, end 31 ("some videos are longer than 30 seconds; these
# were truncated to 30 seconds during annotation", LocalizingMoments), read by its extractor in
# whole seconds 0..31 inclusive, i.e. frames before 32 s.
DIDEMO_MAX_SECONDS = 32.0


def read_didemo(annotations: str, media_dir: str, video_list: Optional[str] = None,
                missing: Optional[list] = None, **_) -> list:
  """DiDeMo `{train,val,test}_data.json` (video, description, times, ...) with `--video_list`
  `{split}_list.txt`: one paragraph per video = all its descriptions joined in file order;
  frames only from the first 32 s (DIDEMO_MAX_SECONDS, as CLIP4Clip reads them)."""
  with open(annotations) as f:
    data = json.load(f)
  sentences: dict = {}
  for ann in data:
    sentences.setdefault(ann["video"], []).append(ann["description"].strip())
  items = []
  for vid, sents in sentences.items():
    stem = os.path.splitext(vid)[0]
    path = find_media(media_dir, vid)
    if not os.path.isfile(path):
      path = find_media(media_dir, stem)
    para = " ".join(s for s in sents if s)
    items.append(Item(vid, path, [para] if para else [], max_seconds=DIDEMO_MAX_SECONDS))
  # the lists and the json name videos with their extension ("...mov"): match on both
  if video_list:
    items = _select_didemo(items, video_list, missing)
  for it in items:
    it.video_id = os.path.splitext(it.video_id)[0]
  return items


def _select_didemo(items, video_list, missing):
  """`_select` matching names with or without their extension (the lists and the json differ)."""
  by_id = {it.video_id: it for it in items}
  by_stem = {os.path.splitext(it.video_id)[0]: it for it in items}
  with open(video_list) as f:
    wanted = list(dict.fromkeys(line.strip() for line in f if line.strip()))
  out, lost = [], []
  for v in wanted:
    it = by_id.get(v) or by_stem.get(os.path.splitext(v)[0])
    if it:
      out.append(it)
    else:
      lost.append(v)
  if missing is not None:
    missing.extend(lost)
  return out


def class_caption(name: str) -> str:
  """Folder name -> words: 'brush_hair' -> 'brush hair', 'ApplyEyeMakeup' -> 'apply eye makeup'."""
  name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name.replace("_", " "))
  return " ".join(name.lower().split())


def read_ucf101(annotations: str, media_dir: str, split: str = "train", fold: int = 1,
                **_) -> list:
  """UCF101: `annotations` = ucfTrainTestlist/ (classInd.txt, {train,test}list0F.txt)."""
  with open(os.path.join(annotations, "classInd.txt")) as f:
    classes = {}
    for line in f:
      if line.strip():
        idx, name = line.split()
        classes[name] = int(idx) - 1
  list_file = os.path.join(annotations, f"{split}list{fold:02d}.txt")
  items = []
  with open(list_file) as f:
    for line in f:
      if not line.strip():
        continue
      rel = line.split()[0]
      cls = rel.split("/")[0]
      if cls not in classes:
        raise ValueError(f"{list_file}: class {cls!r} is not in classInd.txt")
      items.append(Item(os.path.splitext(os.path.basename(rel))[0], os.path.join(media_dir, rel),
                        [class_caption(cls)], classes[cls]))
  return items


def read_hmdb51(annotations: str, media_dir: str, split: str = "train", fold: int = 1,
                **_) -> list:
  """HMDB51: `annotations` = split folder of `{class}_test_split{F}.txt` (1 train, 2 test)."""
  want = {"train": "1", "test": "2"}[split]
  suffix = f"_test_split{fold}.txt"
  names = sorted(n[:-len(suffix)] for n in os.listdir(annotations) if n.endswith(suffix))
  if not names:
    raise ValueError(f"{annotations}: no *{suffix} split files (HMDB51 testTrainMulti_7030_splits)")
  items = []
  for label, cls in enumerate(names):
    with open(os.path.join(annotations, cls + suffix)) as f:
      for line in f:
        parts = line.split()
        if len(parts) == 2 and parts[1] == want:
          items.append(Item(os.path.splitext(parts[0])[0],
                            os.path.join(media_dir, cls, parts[0]), [class_caption(cls)], label))
  return items


READERS = {
    "csv": read_csv, "webvid": read_webvid, "cc3m": read_cc3m, "img2dataset": read_img2dataset,
    "msrvtt": read_msrvtt,
    "msvd": read_msvd, "lsmdc": read_lsmdc, "didemo": read_didemo, "hmdb51": read_hmdb51,
    "ucf101": read_ucf101,
}


def read_items(fmt: str, annotations: str, media_dir: str, **kwargs) -> list:
  if fmt not in READERS:
    raise ValueError(f"--format={fmt!r} is unknown: use one of {sorted(READERS)}")
  if not os.path.exists(annotations):
    raise FileNotFoundError(f"--annotations={annotations} does not exist")
  return READERS[fmt](annotations, media_dir, **kwargs)
