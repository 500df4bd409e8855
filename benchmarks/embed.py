"""Throughput of `python -m miles_jax.embed`: clips/s from video files to an index.

  python benchmarks/embed.py --size tiny --videos 48 --workers 2
  python benchmarks/embed.py --size base --videos 16 --workers 2

Writes `--videos` mp4 files (H.264, 320x240, `--seconds` at 25 fps, a moving pattern) with
PyAV, exports a randomly initialised model of `--size` (configs/default.py presets; speed does
not depend on the weights) and runs the embed CLI on them, timing the whole command and reading
the CLI's own clips/s (decode + model, after start-up). The last line is one JSON object.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_video(path, seconds, seed, w=320, h=240, fps=25):
  import av
  yy, xx = np.mgrid[0:h, 0:w]
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for t in range(int(seconds * fps)):
      f = np.zeros((h, w, 3), np.uint8)
      f[..., 0] = (xx + 3 * t + 40 * seed) % 256
      f[..., 1] = (yy + 2 * t) % 256
      f[..., 2] = 128 + 60 * np.sin((xx - yy + 4 * t) / 15.0)
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
  ap.add_argument("--videos", type=int, default=48)
  ap.add_argument("--seconds", type=float, default=8.0)
  ap.add_argument("--workers", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--dir", default=None, help="working folder (default: a temporary one)")
  a = ap.parse_args()
  sys.path.insert(0, ROOT)
  import jax
  from miles_jax import checkpoints, config_lib
  from miles_jax.convert import init_model_params

  d = a.dir or tempfile.mkdtemp(prefix="embed_bench_")
  vids = os.path.join(d, "videos")
  os.makedirs(vids, exist_ok=True)
  for i in range(a.videos):
    p = os.path.join(vids, f"v{i:04d}.mp4")
    if not os.path.exists(p):
      write_video(p, a.seconds, i)
  c = config_lib.default_config()
  c.model = config_lib.model_config(a.size)
  c.model.kernels = "xla_cpu"  # a CPU measurement: the CPU kernels (models/xla_cpu.py)
  c.data.num_frames = 4
  export = os.path.join(d, f"export-{a.size}")
  if not os.path.exists(export):
    checkpoints.save_params(export, init_model_params(c.model, jax.random.PRNGKey(0)), c.model)
    checkpoints.save_assets(export, c)
  out = os.path.join(d, f"index-{a.size}")
  t0 = time.time()
  r = subprocess.run([sys.executable, "-m", "miles_jax.embed", f"--checkpoint={export}",
                      f"--videos={vids}", f"--out={out}", "--overwrite", "--no_progress",
                      f"--workers={a.workers}", f"--batch_size={a.batch_size}"],
                     cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  wall = time.time() - t0
  if r.returncode:
    sys.exit(r.stderr[-3000:])
  print(r.stdout.strip())
  rate = float(re.search(r"= ([0-9.]+) clips/s", r.stdout).group(1))
  res = {"size": a.size, "videos": a.videos, "seconds_per_video": a.seconds,
         "resolution": "320x240", "workers": a.workers or os.cpu_count(),
         "cpu_cores": os.cpu_count(), "clips_per_s": rate,
         "command_wall_s": round(wall, 1), "command_clips_per_s": round(a.videos / wall, 2)}
  print(json.dumps(res))


if __name__ == "__main__":
  main()
