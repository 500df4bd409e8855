"""Readers of each dataset's published annotation layout -> a list of `Item`s.

A reader only parses annotations and points at media files; it never opens media. Rows whose
file is missing or whose caption is empty are still returned: `prepare` skips and reports them.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Optional

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".flv", ".mpg", ".3gp")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass
class Item:
  video_id: str
  path: str
  captions: list
  label: int = -1
  is_image: bool = False


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


def _video_filter(video_list: Optional[str]) -> Callable[[str], bool]:
  if not video_list:
    return lambda vid: True
  with open(video_list) as f:
    keep = {os.path.splitext(line.split()[0])[0] for line in f if line.strip()}
  return lambda vid: os.path.splitext(vid)[0] in keep


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
  """CC3M tsv `caption<TAB>url` (no header); image i at media_dir/{i:09d}.jpg or {i}.jpg."""
  items = []
  with open(annotations, newline="") as f:
    for i, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
      if not row:
        continue
      path = find_media(media_dir, f"{i:09d}", IMAGE_EXTS)
      if not os.path.isfile(path):
        path = find_media(media_dir, str(i), IMAGE_EXTS)
      cap = row[0].strip()
      items.append(Item(f"{i:09d}", path, [cap] if cap else [], is_image=True))
  return items


def read_msrvtt(annotations: str, media_dir: str, video_list: Optional[str] = None, **_) -> list:
  """MSR-VTT: the 1k-A test csv (key,vid_key,video_id,sentence) or the json (videos+sentences)."""
  keep = _video_filter(video_list)
  media = lambda vid: find_media(media_dir, vid)
  if annotations.endswith(".csv"):
    with open(annotations, newline="") as f:
      rows = [(r["video_id"].strip(), r["sentence"]) for r in csv.DictReader(f)]
  else:
    with open(annotations) as f:
      data = json.load(f)
    rows = [(s["video_id"], s["caption"]) for s in data["sentences"]]
  return _group([(v, c) for v, c in rows if keep(v)], media)


def read_msvd(annotations: str, media_dir: str, video_list: Optional[str] = None, **_) -> list:
  """MSVD AllVideoDescriptions.txt: `vid caption words` per line, '#' comments, many per vid."""
  keep = _video_filter(video_list)
  rows = []
  with open(annotations) as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      vid, _, cap = line.partition(" ")
      if keep(vid):
        rows.append((vid, cap))
  return _group(rows, lambda vid: find_media(media_dir, vid))


def read_lsmdc(annotations: str, media_dir: str, **_) -> list:
  """LSMDC tsv/csv: clip_id, 4 time columns, sentence; clips at [movie/]clip_id.avi."""
  items = []
  with open(annotations, newline="") as f:
    sample = f.read(4096)
    f.seek(0)
    delim = "\t" if "\t" in sample else ","
    for row in csv.reader(f, delimiter=delim, quoting=csv.QUOTE_NONE):
      if not row or not row[0].strip():
        continue
      clip = row[0].strip()
      movie = clip.rsplit("_", 1)[0]
      cap = row[-1].strip() if len(row) > 1 else ""
      items.append(Item(clip, find_media(media_dir, clip, subdirs=(movie, "")),
                        [cap] if cap else []))
  return items


def read_didemo(annotations: str, media_dir: str, **_) -> list:
  """DiDeMo json: one paragraph per video = all its descriptions joined in file order."""
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
    items.append(Item(stem, path, [para] if para else []))
  return items


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
    "csv": read_csv, "webvid": read_webvid, "cc3m": read_cc3m, "msrvtt": read_msrvtt,
    "msvd": read_msvd, "lsmdc": read_lsmdc, "didemo": read_didemo, "hmdb51": read_hmdb51,
    "ucf101": read_ucf101,
}


def read_items(fmt: str, annotations: str, media_dir: str, **kwargs) -> list:
  if fmt not in READERS:
    raise ValueError(f"--format={fmt!r} is unknown: use one of {sorted(READERS)}")
  if not os.path.exists(annotations):
    raise FileNotFoundError(f"--annotations={annotations} does not exist")
  return READERS[fmt](annotations, media_dir, **kwargs)
