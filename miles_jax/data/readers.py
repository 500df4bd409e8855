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

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp",
              ".3g2", ".wmv", ".mts", ".m2ts")
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

# The published test sets: (format, split) -> videos (per official fold for hmdb51 / ucf101).
# MSR-VTT 1k-A (JSFusion), MSVD (collaborative-experts' test_list.txt), LSMDC16 public test
# (challenge_1000), DiDeMo test_list.txt, HMDB51 30 test clips x 51 classes per split,
# UCF101 testlist01/02/03.txt.
EXPECTED_SIZES = {
    ("msrvtt", "test"): 1000, ("msvd", "test"): 670, ("lsmdc", "test"): 1000,
    ("didemo", "test"): 1004, ("hmdb51", "test1"): 1530, ("hmdb51", "test2"): 1530,
    ("hmdb51", "test3"): 1530, ("ucf101", "test1"): 3783, ("ucf101", "test2"): 3734,
    ("ucf101", "test3"): 3696,
}


def expected_size(fmt: str, split: str) -> int:
  """Videos of the benchmark's published `split` for reader `fmt`; 0 when there is none."""
  return EXPECTED_SIZES.get((fmt, split), 0)


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


MISSING = ""  # iter_local_media's path for a tar member that is not in its archive


def iter_local_media(items: list):
  """Yields (item, local path) for every item: None for plain files (use `item.path`), a
  temporary file for a member of a webdataset tar (`ARCHIVE.tar::MEMBER`), MISSING when the
  archive or member does not exist. Plain files come first in order; then each archive's
  members, read in one streaming pass per archive (in the archive's order), so a tar of N items
  is read once, not N times. A temporary file lives until the next item is asked for."""
  import tarfile
  import tempfile
  by_archive: dict = {}
  for it in items:
    if TAR_SEP in it.path:
      archive, member = it.path.split(TAR_SEP, 1)
      by_archive.setdefault(archive, {}).setdefault(member, []).append(it)
    else:
      yield it, None
  for archive, wanted in by_archive.items():
    if os.path.isfile(archive):
      with tarfile.open(archive, "r|*") as tf, tempfile.TemporaryDirectory() as tmp:
        for m in tf:
          group = wanted.pop(m.name, None) if m.isfile() else None
          if not group:
            continue
          local = os.path.join(tmp, "member" + os.path.splitext(m.name)[1])
          with open(local, "wb") as f:
            f.write(tf.extractfile(m).read())
          for it in group:
            yield it, local
          os.remove(local)
    for group in wanted.values():
      for it in group:
        yield it, MISSING


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
      # one streaming pass: image member names and the .txt captions beside them
      images, captions = [], {}
      with tarfile.open(full, "r|*") as tf:
        for m in tf:
          if not m.isfile():
            continue
          key, ext = os.path.splitext(m.name)
          if ext.lower() in IMAGE_EXTS:
            images.append(m.name)
          elif ext == ".txt":
            captions[key] = tf.extractfile(m).read().decode("utf-8").strip()
      for mname in sorted(images):
        key = os.path.splitext(mname)[0]
        cap = captions.get(key, "")
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


FROZEN_CAPTION_INDEX = "jsfusion_val_caption_idx.pkl"


def frozen_caption_index(annotations: str, video_list: Optional[str]) -> list:
  """Where Frozen keeps its 1k-A caption index for MSR_VTT.json: beside the split list, in
  `../high-quality/structured-symlinks/` of `annotation/MSR_VTT.json`, or beside the json."""
  ann_dir = os.path.dirname(os.path.abspath(annotations))
  dirs = ([os.path.dirname(os.path.abspath(video_list))] if video_list else []) + [
      os.path.join(os.path.dirname(ann_dir), "high-quality", "structured-symlinks"), ann_dir]
  return [os.path.join(d, FROZEN_CAPTION_INDEX) for d in dirs]


def read_msrvtt(annotations: str, media_dir: str, video_list: Optional[str] = None,
                missing: Optional[list] = None, caption_index: Optional[str] = None,
                split: str = "train", **_) -> list:
  """MSR-VTT, any of the published annotation files:
  - `MSRVTT_JSFUSION_test.csv` (key, vid_key, video_id, sentence): the 1k-A test pairs;
  - CLIP4Clip's `MSRVTT_data.json` / the original `train_val_videodatainfo.json`
    (`sentences`: [{video_id, caption}]);
  - Frozen-in-Time's `MSR_VTT.json` (`annotations`: [{image_id, caption}]).
  `video_list`: Frozen's split file (`train_list_jsfusion.txt`, `val_list_jsfusion.txt`, ...) or
  CLIP4Clip's `MSRVTT_train.9k.csv`. `caption_index`: Frozen's `jsfusion_val_caption_idx.pkl`
  ({video_id: index}) keeps that one caption per video, as Frozen's 1k-A test does. With
  `MSR_VTT.json` and a val/test split it is applied by default, as Frozen always does there
  (found by `frozen_caption_index`; missing is an error); `caption_index="none"` keeps every
  caption.
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
      if caption_index is None and split != "train":
        found = [p for p in frozen_caption_index(annotations, video_list) if os.path.isfile(p)]
        if not found:
          raise ValueError(
              f"--annotations={annotations}: Frozen's {split} split (1k-A) keeps one caption per "
              f"video by {FROZEN_CAPTION_INDEX}, not found in "
              f"{', '.join(os.path.dirname(p) for p in frozen_caption_index(annotations, video_list))}"
              f": pass --caption_index=PATH/{FROZEN_CAPTION_INDEX} "
              "(or --caption_index=none for every caption)")
        caption_index = found[0]
    else:
      keys = sorted(data) if isinstance(data, dict) else type(data).__name__
      raise ValueError(f"--annotations={annotations}: expected a 'sentences' (MSRVTT_data.json) "
                       f"or 'annotations' (Frozen's MSR_VTT.json) list, found {keys}")
  items = _select(_group(rows, media), video_list, missing)
  if caption_index and caption_index.lower() != "none":
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


def didemo_media(media_dir: str, name: str) -> str:
  """The file of DiDeMo video `name` (the json's `video` field): the name verbatim, as the
  original download script and CLIP4Clip save it (`.mov`, `.wmv`, `.mts`, `.3g2`, a trailing
  `.`, ...), then `name.mp4` and `<stem>.<ext>` (converted copies); the verbatim path if none
  exists."""
  stem = os.path.splitext(name)[0] if not name.endswith(".") else name.rstrip(".")
  candidates = [os.path.join(media_dir, name), os.path.join(media_dir, name + ".mp4")]
  candidates += [os.path.join(media_dir, stem + e) for e in VIDEO_EXTS]
  for c in candidates:
    if os.path.isfile(c):
      return c
  return candidates[0]


def didemo_id(name: str) -> str:
  """A DiDeMo video name without its extension (or trailing '.'): the id shards carry."""
  return name.rstrip(".") if name.endswith(".") else os.path.splitext(name)[0]


def read_didemo(annotations: str, media_dir: str, video_list: Optional[str] = None,
                missing: Optional[list] = None, **_) -> list:
  """DiDeMo `{train,val,test}_data.json` (video, description, times, ...) with `--video_list`
  `{split}_list.txt`: one paragraph per video = all its descriptions joined in file order;
  frames only from the first 32 s (DIDEMO_MAX_SECONDS, as CLIP4Clip reads them). Files are
  found by `didemo_media`. Two names with one stem (`X.mov` and `X.mp4`) would give two
  videos one id: an error naming them (the split list picks one)."""
  with open(annotations) as f:
    data = json.load(f)
  sentences: dict = {}
  for ann in data:
    sentences.setdefault(ann["video"], []).append(ann["description"].strip())
  items = []
  for vid, sents in sentences.items():
    para = " ".join(s for s in sents if s)
    items.append(Item(vid, didemo_media(media_dir, vid), [para] if para else [],
                      max_seconds=DIDEMO_MAX_SECONDS))
  # the lists and the json name videos with their extension ("...mov"): match on both
  if video_list:
    items = _select_didemo(items, video_list, missing)
  names: dict = {}
  for it in items:
    names.setdefault(didemo_id(it.video_id), []).append(it.video_id)
  dups = {k: v for k, v in names.items() if len(v) > 1}
  if dups:
    shown = "; ".join(" / ".join(v) for v in list(dups.values())[:5])
    raise ValueError(f"--annotations={annotations}: {len(dups)} video ids are shared by two "
                     f"files ({shown}{'; ...' if len(dups) > 5 else ''}): pass the split's "
                     "list (--video_list=test_list.txt) that names one of each")
  for it in items:
    it.video_id = didemo_id(it.video_id)
  return items


def _select_didemo(items, video_list, missing):
  """`_select` matching names with or without their extension (the lists and the json differ)."""
  by_id = {it.video_id: it for it in items}
  by_stem: dict = {}
  for it in items:
    by_stem.setdefault(didemo_id(it.video_id), it)
  with open(video_list) as f:
    wanted = list(dict.fromkeys(line.strip() for line in f if line.strip()))
  out, lost = [], []
  for v in wanted:
    it = by_id.get(v) or by_stem.get(didemo_id(v))
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
