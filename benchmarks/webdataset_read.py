r"""Items/s of `prepare` on an img2dataset webdataset tar: one streaming pass vs one tar scan per item.

  python benchmarks/webdataset_read.py                      # 10,000-item tar, 64 px images
  python benchmarks/webdataset_read.py --items=500 --rescan_items=20   # seconds

Writes its own tar the way img2dataset's `webdataset` output lays it out (`00000.tar` with
`{key:09d}.jpg`, `.txt`, `.json` per sample, in key order; small JPEG q90 images), then times:
* streaming (what prepare does): `readers.read_img2dataset` (one pass listing members and
  captions) + `prepare.prepare` of every item into one shard (one pass over the tar, each image
  decoded, resized and re-encoded);
* rescan (what prepare did before the tar was streamed): the same per-item work where each item
  opens the tar and looks its member up (`readers.media_exists` + `readers.local_media`), i.e.
  a scan of the tar's headers per item; timed on the first `--rescan_items` items only, since
  its cost per item grows with the tar (the whole tar is scanned for every item).
Prints one line per mode and, last, a JSON object with every figure.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miles_jax.data import prepare, readers, schema  # noqa: E402


def write_tar(path: str, n: int, size: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  with tarfile.open(path, "w") as t:
    for i in range(n):
      key = f"{i:09d}"
      img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      for ext, data in (("jpg", schema.encode_jpeg(img, 90)),
                        ("txt", f"a photo number {i}".encode()),
                        ("json", json.dumps({"key": key, "status": "success"}).encode())):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--items", type=int, default=10000)
  ap.add_argument("--size", type=int, default=64, help="image side in px")
  ap.add_argument("--rescan_items", type=int, default=50)
  ap.add_argument("--resolution", type=int, default=64, help="prepare --resolution")
  a = ap.parse_args(argv)
  with tempfile.TemporaryDirectory() as d:
    wds = os.path.join(d, "wds")
    os.makedirs(wds)
    write_tar(os.path.join(wds, "00000.tar"), a.items, a.size)
    tar_mb = os.path.getsize(os.path.join(wds, "00000.tar")) / 2**20
    t0 = time.perf_counter()
    items = readers.read_items("img2dataset", wds, "")
    t_read = time.perf_counter() - t0
    rep = prepare.prepare(items, os.path.join(d, "out"), num_shards=1, frames_per_clip=1,
                          resolution=a.resolution, workers=1, verbose=False)
    t_stream = time.perf_counter() - t0
    assert rep["written"] == a.items, rep["skipped"][:3]
    t0 = time.perf_counter()
    k = min(a.rescan_items, len(items))
    for it in items[:k]:
      res = prepare.encode_item(it, 1, a.resolution)  # no local_path: opens the tar per item
      assert res["record"] is not None, res
    t_rescan = time.perf_counter() - t0
  out = {"items": a.items, "image_px": a.size, "tar_mb": round(tar_mb, 1),
         "read_items_s": round(t_read, 2),
         "streaming_items_per_s": round(a.items / t_stream, 1),
         "streaming_seconds": round(t_stream, 2),
         "rescan_items_timed": k, "rescan_items_per_s": round(k / t_rescan, 2),
         "rescan_seconds_per_item": round(t_rescan / k, 3)}
  print(f"streaming (one pass per tar): {out['streaming_items_per_s']} items/s "
        f"({a.items} items, {t_stream:.1f} s incl. {t_read:.1f} s listing)")
  print(f"rescan (tar opened per item): {out['rescan_items_per_s']} items/s "
        f"({out['rescan_seconds_per_item']} s per item, first {k} items of the same tar)")
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
