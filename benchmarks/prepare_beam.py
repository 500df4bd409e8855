r"""prepare throughput: the multiprocessing pool vs. Apache Beam's DirectRunner (multi-process mode)
on the same clips in one run, and the per-core rate behind docs/data.md's Beam cost table.

  nice -n 10 python benchmarks/prepare_beam.py            # 16 clips of 10 s at 640x272, 2 workers
  python benchmarks/prepare_beam.py --quick               # tiny, seconds: proves the script works
  python benchmarks/prepare_beam.py --json                # last line: one JSON object
  python benchmarks/prepare_beam.py --table               # also the docs' cost / time table

Generates its own media: `--clips` h264 mp4 clips of `--seconds` s at `--width`x`--height`,
`--fps` (moving gradients plus per-frame noise, so the decoder has real work), and `--images`
JPEGs (CC3M-like). Each path runs `prepare.prepare` on the train split (`--frames_per_clip`
frames, `--resolution` px short side) into a fresh folder with `--workers` processes:
* pool: prepare's default multiprocessing pool;
* beam: the same call with runner="DirectRunner", direct_running_mode=multi_processing,
  direct_num_workers=--workers (worker start-up included: that is what a user waits for).
The outputs are checked to hold the same records. videos/s is wall-clock, worker start-up
included (on a shared machine see the load average it prints). The per-core rate is measured
apart, robust to other load: one in-process run (workers=1) after a warm-up, clips divided by
its CPU seconds. The table extrapolates that rate, scaled by clip length (decoding cost follows
the number of frames), to WebVid-2M, WebVid-10M (average clip 18 s) and CC3M (the image rate),
with `--price` per vCPU-hour (a list-price assumption: pass your own).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from miles_jax.data import prepare, readers, schema  # noqa: E402

# (name, items, average seconds per clip; 0 = images)
DATASETS = [("WebVid-2M", 2_500_000, 18.0), ("WebVid-10M", 10_700_000, 18.0),
            ("CC3M", 3_300_000, 0.0)]


def write_clip(path: str, seconds: float, fps: int, width: int, height: int, seed: int):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    s.options = {"preset": "veryfast", "crf": "23"}
    for t in range(int(seconds * fps)):
      f = np.empty((height, width, 3), np.int16)
      f[..., 0] = (xx + 3 * t + 40 * seed) % 256
      f[..., 1] = (yy * 2 + 2 * t) % 256
      f[..., 2] = 128 + (60 * np.sin((xx + yy + 5 * t) / 23.0)).astype(np.int16)
      f += rng.integers(-10, 11, (height, width, 1), dtype=np.int16)
      frame = av.VideoFrame.from_ndarray(np.clip(f, 0, 255).astype(np.uint8), format="rgb24")
      for p in s.encode(frame):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def make_media(root: str, a) -> tuple:
  clips, images = [], []
  for i in range(a.clips):
    path = os.path.join(root, f"clip{i:04d}.mp4")
    write_clip(path, a.seconds, a.fps, a.width, a.height, i)
    clips.append(readers.Item(f"clip{i:04d}", path, [f"clip number {i}"]))
  rng = np.random.default_rng(0)
  for i in range(a.images):
    path = os.path.join(root, f"img{i:04d}.jpg")
    img = rng.integers(0, 256, (a.image_height, a.image_width, 3), dtype=np.uint8)
    img = (img // 4 + np.linspace(0, 190, a.image_width, dtype=np.uint8)[None, :, None])
    with open(path, "wb") as f:
      f.write(schema.encode_jpeg(img, 90))
    images.append(readers.Item(f"img{i:04d}", path, [f"image number {i}"], is_image=True))
  return clips, images


def cpu_seconds() -> float:
  """CPU time of this process and of its finished children (pool / Beam worker processes)."""
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(items, out, a, runner=None, options=(), workers=None):
  """(wall seconds, CPU seconds) of one prepare run into a fresh folder."""
  t0, c0 = time.perf_counter(), cpu_seconds()
  rep = prepare.prepare(items, out, "train", num_shards=a.shards,
                        frames_per_clip=a.frames_per_clip, resolution=a.resolution,
                        workers=workers or a.workers, verbose=False, runner=runner,
                        beam_options=options)
  seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  assert rep["written"] == len(items), rep
  return seconds, cpu


def records(out):
  return {f: [r.numpy() for r in tf.data.TFRecordDataset(os.path.join(out, f))]
          for f in sorted(os.listdir(out)) if f.endswith(".tfrecord")}


def table(per_core_clip: float, clip_seconds: float, per_core_image: float, price: float,
          cores: int) -> str:
  """Markdown: CPU-hours, hours on `cores` vCPUs and cost at `price` per vCPU-hour."""
  lines = [f"| dataset | items | CPU-hours | hours on {cores} vCPUs | cost at ${price}/vCPU-h |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for name, n, secs in DATASETS:
    rate = per_core_image if secs == 0 else per_core_clip * clip_seconds / secs
    cpu_h = n / rate / 3600
    hours, cost = cpu_h / cores, cpu_h * price
    lines.append(f"| {name} | {n:,} | {cpu_h:,.{0 if cpu_h >= 10 else 1}f} | "
                 f"{hours:,.{1 if hours >= 1 else 2}f} | ${cost:,.{0 if cost >= 10 else 2}f} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script works")
  p.add_argument("--json", action="store_true")
  p.add_argument("--table", action="store_true", help="print the docs' cost / time table")
  p.add_argument("--clips", type=int, default=16)
  p.add_argument("--seconds", type=float, default=10.0)
  p.add_argument("--fps", type=int, default=25)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--height", type=int, default=272)
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--image_width", type=int, default=400)
  p.add_argument("--image_height", type=int, default=300)
  p.add_argument("--frames_per_clip", type=int, default=16)
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--shards", type=int, default=8)
  p.add_argument("--price", type=float, default=0.06,
                 help="$ per vCPU-hour for the table (assumed; pass your own)")
  p.add_argument("--cores", type=int, default=512, help="vCPUs of the table's cluster")
  a = p.parse_args()
  if a.quick:
    a.clips, a.seconds, a.width, a.height, a.images, a.shards = 4, 1.0, 64, 48, 4, 2
    a.resolution, a.frames_per_clip = 32, 4
  root = tempfile.mkdtemp(prefix="prepare_beam_")
  try:
    t0 = time.perf_counter()
    os.makedirs(os.path.join(root, "media"))
    clips, images = make_media(os.path.join(root, "media"), a)
    made = time.perf_counter() - t0
    options = ["direct_running_mode=multi_processing", f"direct_num_workers={a.workers}"]
    timed(clips[:1], os.path.join(root, "warmup"), a, workers=1)  # imports, first decode
    serial_s, serial_cpu = timed(clips, os.path.join(root, "serial"), a, workers=1)
    pool_s, pool_cpu = timed(clips, os.path.join(root, "pool"), a)
    beam_s, beam_cpu = timed(clips, os.path.join(root, "beam"), a, "DirectRunner", options)
    same = (records(os.path.join(root, "pool")) == records(os.path.join(root, "beam"))
            == records(os.path.join(root, "serial")))
    image_s, image_cpu = (timed(images, os.path.join(root, "images"), a, workers=1) if images
                          else (float("nan"), float("nan")))
    res = {
        "clips": a.clips, "clip_seconds": a.seconds, "size": f"{a.width}x{a.height}",
        "fps": a.fps, "frames_per_clip": a.frames_per_clip, "resolution": a.resolution,
        "workers": a.workers, "shards": a.shards, "media_seconds": round(made, 1),
        "pool_seconds": round(pool_s, 2), "beam_seconds": round(beam_s, 2),
        "pool_videos_per_s": round(a.clips / pool_s, 3),
        "beam_videos_per_s": round(a.clips / beam_s, 3),
        "beam_over_pool": round(pool_s / beam_s, 3),
        "pool_cpu_seconds": round(pool_cpu, 1), "beam_cpu_seconds": round(beam_cpu, 1),
        "serial_seconds": round(serial_s, 2), "serial_cpu_seconds": round(serial_cpu, 2),
        "videos_per_cpu_s": round(a.clips / serial_cpu, 3),
        "images": a.images, "image_size": f"{a.image_width}x{a.image_height}",
        "images_per_cpu_s": round(a.images / image_cpu, 2),
        "same_records": same, "load_average": [round(x, 2) for x in os.getloadavg()],
    }
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"{a.clips} clips of {a.seconds:g} s {res['size']} @ {a.fps} fps -> {a.frames_per_clip} "
        f"frames at {a.resolution} px, {a.workers} workers, {a.shards} shards")
  print(f"  pool:                          {res['pool_videos_per_s']:.3f} videos/s "
        f"({res['pool_seconds']} s)")
  print(f"  DirectRunner multi_processing: {res['beam_videos_per_s']:.3f} videos/s "
        f"({res['beam_seconds']} s)")
  print(f"  beam / pool: {res['beam_over_pool']:.3f}   same records: {same}")
  print(f"  CPU seconds (with worker processes): pool {res['pool_cpu_seconds']}, "
        f"beam {res['beam_cpu_seconds']}")
  print(f"  per core, one process after warm-up: {res['videos_per_cpu_s']:.3f} videos per "
        f"CPU-second, {res['images_per_cpu_s']:.2f} images per CPU-second "
        f"({res['image_size']} JPEG)")
  print(f"  load average at the end: {res['load_average']}")
  if a.table:
    print(table(res["videos_per_cpu_s"], a.seconds, res["images_per_cpu_s"], a.price,
                a.cores))
  if a.json:
    print(json.dumps(res))
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
