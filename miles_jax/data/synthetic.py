r"""A procedural video-text dataset whose captions need temporal order (the embedded demo data).

  python -m miles_jax.data.synthetic --out=data/synthetic [--train=1024 --eval=512 \
      --resolution=32 --frames=8 --seed=0 --distractors=0 --caption_noise=0]

Each clip shows coloured shapes (red/green/blue/yellow square/circle/triangle) on a dark noisy
background. A caption is one event, "a red square moves left", or two in order, "a red square
grows then a blue circle appears": the first object acts in the first half of the clip, the
second in the second half, so reversing the order gives a different caption for different
frames. Events: moves left/right/up/down, grows, shrinks, appears, disappears. With
`--distractors=N` every clip also shows N static shapes that the caption does not mention (each
differs from every acting object in colour or shape and stays still and visible), drawn under
the actors: the model has to find the object that acts, not just the colours and shapes present.
With `--caption_noise=P` a fraction P of the training clips get a randomly drawn caption instead
of their own (the clips are unchanged and the held-out split stays clean): mismatched pairs, as
web alt-text often is.

Writes, with the schema and shard writer of `prepare`: `train-*-of-00004.tfrecord`,
`eval-*-of-00002.tfrecord` (held out: other seed, captions unique within the split),
`vocab.txt` (WordPiece vocabulary of the closed word list: every word is one token, so the
standard BERT tokenizer applies unchanged) and `synthetic.json` (the parameters).
Config: data.train=OUT/train-*.tfrecord data.eval=OUT/eval-*.tfrecord data.tokenizer=OUT/vocab.txt
"""
from __future__ import annotations

from miles_jax.cli import setup_process

if __name__ == "__main__":  # before TensorFlow / jaxlib load: the log filter, path settings
  setup_process()

import functools
import json
import os
import sys
import time

import numpy as np

from miles_jax import cli

COLORS = {"red": (220, 45, 45), "green": (45, 200, 70), "blue": (60, 100, 235),
          "yellow": (235, 215, 50)}
SHAPES = ("square", "circle", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENTS = tuple(f"moves {d}" for d in MOTIONS) + ("grows", "shrinks", "appears", "disappears")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TRAIN_SHARDS, EVAL_SHARDS = 4, 2


def vocabulary() -> list:
  words = {"a", "then"}
  words.update(COLORS)
  words.update(SHAPES)
  for e in EVENTS:
    words.update(e.split())
  return list(SPECIAL_TOKENS) + sorted(words)


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int):
  return np.mgrid[0:size, 0:size].astype(np.float32) + 0.5


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  yy, xx = _pixel_centres(size)
  dx, dy = xx - cx, yy - cy
  if shape == "square":
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) * 0.5 + 0.5)  # triangle, apex up


class _Object:
  """One shape and its state (visible, centre, radius) as a function of event progress p."""

  def __init__(self, rng, size, color, shape, event):
    self.color, self.shape, self.event = color, shape, event
    self.r0 = size * rng.uniform(0.13, 0.18)
    self.dist = size * 0.4  # how far a move goes
    lo, hi = self.r0 * 1.45, size - self.r0 * 1.45
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if event.startswith("moves"):
      dx, dy = MOTIONS[event.split()[1]]
      # start so that the whole move stays inside the frame
      cx = rng.uniform(lo + self.dist, hi) if dx < 0 else rng.uniform(lo, hi - self.dist) \
          if dx > 0 else cx
      cy = rng.uniform(lo + self.dist, hi) if dy < 0 else rng.uniform(lo, hi - self.dist) \
          if dy > 0 else cy
    self.cx, self.cy = cx, cy

  def state(self, p: float):
    """(visible, cx, cy, r) at progress p in [0, 1] of this object's event."""
    cx, cy, r = self.cx, self.cy, self.r0
    if self.event.startswith("moves"):
      dx, dy = MOTIONS[self.event.split()[1]]
      cx, cy = cx + dx * self.dist * p, cy + dy * self.dist * p
    elif self.event == "grows":
      r = self.r0 * (0.55 + 0.9 * p)
    elif self.event == "shrinks":
      r = self.r0 * (1.45 - 0.9 * p)
    visible = {"appears": p >= 0.5, "disappears": p < 0.5}.get(self.event, True)
    return visible, cx, cy, r


def _draw(frame, obj, state, size):
  visible, cx, cy, r = state
  if visible:
    frame[_shape_mask(obj.shape, size, cx, cy, r)] = COLORS[obj.color]


def render_clip(rng: np.random.Generator, size: int, frames: int, parts: list,
                distractors: int = 0) -> np.ndarray:
  """uint8 [frames, size, size, 3] for parts = [(color, shape, event), ...] acting in order,
  over `distractors` static shapes that no part names."""
  base = rng.integers(10, 40, size=(1, size, size, 3)).astype(np.uint8)  # dark noise, fixed
  objs = [_Object(rng, size, *p) for p in parts]
  for _ in range(distractors):  # drawn once, under the actors, for every frame
    color, shape, _ = _part(rng, avoid=[p[:2] for p in parts])
    still = _Object(rng, size, color, shape, "stays")
    _draw(base[0], still, still.state(0.0), size)
  clip = np.repeat(base, frames, axis=0)
  half = frames / len(objs)  # object i acts during frames [i * half, (i + 1) * half)
  for t in range(frames):
    for i, obj in enumerate(objs):
      p = float(np.clip((t - i * half) / max(half - 1, 1), 0.0, 1.0))
      _draw(clip[t], obj, obj.state(p), size)
  return clip


def _part(rng, avoid=()):
  """A random (colour, shape, event) whose (colour, shape) is none of `avoid`'s."""
  while True:
    p = (str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), str(rng.choice(EVENTS)))
    if p[:2] not in avoid:
      return p


def sample_parts(rng: np.random.Generator) -> list:
  """One or two events; in two, the objects differ in colour or shape."""
  first = _part(rng)
  return [first] if rng.random() < 0.5 else [first, _part(rng, avoid=[first[:2]])]


def caption(parts: list) -> str:
  return " then ".join(f"a {c} {s} {e}" for c, s, e in parts)


def examples(num: int, seed: int, size: int, frames: int, unique: bool = False,
             distractors: int = 0, caption_noise: float = 0.0):
  """Yields (video_id, caption, frames uint8 [K, S, S, 3]).

  `caption_noise`: the fraction of clips whose caption is replaced by an independently drawn
  one (drawn from a second random stream, so the clips themselves do not change)."""
  rng = np.random.default_rng(seed)
  noise = np.random.default_rng([seed, 1]) if caption_noise else None
  seen = set()
  i = 0
  while i < num:
    parts = sample_parts(rng)
    cap = caption(parts)
    if unique:
      if cap in seen:
        continue
      seen.add(cap)
    clip = render_clip(rng, size, frames, parts, distractors)
    if noise is not None and noise.random() < caption_noise:
      cap = caption(sample_parts(noise))  # a mismatched pair, as web alt-text often is
    yield f"synthetic-{seed}-{i:06d}", cap, clip
    i += 1


def check_options(distractors: int = 0, caption_noise: float = 0.0) -> None:
  """ValueError naming the option (`distractors=…`, `caption_noise=…`) when one is out of range."""
  if distractors < 0:
    raise ValueError(f"distractors={distractors}: give 0 or more static shapes per clip")
  if not 0.0 <= caption_noise < 1.0:
    raise ValueError(f"caption_noise={caption_noise}: give the fraction of train captions "
                     "replaced by a random one, in [0, 1)")


def generate(out: str, num_train: int = 1024, num_eval: int = 512, resolution: int = 32,
             frames: int = 8, seed: int = 0, fps: float = 8.0, distractors: int = 0,
             caption_noise: float = 0.0, verbose: bool = True) -> dict:
  """Writes the dataset to `out`; returns the config paths {train, eval, tokenizer}."""
  check_options(distractors, caption_noise)
  from miles_jax.data import prepare, schema
  os.makedirs(out, exist_ok=True)
  t0 = time.time()
  params = dict(num_train=num_train, num_eval=num_eval, resolution=resolution, frames=frames,
                seed=seed, fps=fps, distractors=distractors, caption_noise=caption_noise)
  # the held-out split keeps every caption true
  splits = (("train", num_train, seed * 2, TRAIN_SHARDS, False, caption_noise),
            ("eval", num_eval, seed * 2 + 1, EVAL_SHARDS, True, 0.0))
  from miles_jax import console
  # a bar only when generation is slow enough to wait for (a large --train / --resolution)
  bar = console.progress(total=num_train + num_eval, desc="synthetic", unit="clip", delay=5.0,
                         disable=not verbose)
  for split, num, split_seed, shards, unique, noise in splits:
    records = [[] for _ in range(shards)]
    for i, (vid, cap, clip) in enumerate(examples(num, split_seed, resolution, frames, unique,
                                                         distractors, noise)):
      ex = schema.make_example(vid, [cap], clip, fps=fps,
                               timestamps=[t / fps for t in range(frames)])
      records[i % shards].append(ex.SerializeToString())
      bar.update()
    for s in range(shards):
      prepare.write_records(os.path.join(out, prepare.shard_name(split, s, shards)), records[s])
  bar.close()
  with open(os.path.join(out, "vocab.txt"), "w") as f:
    f.write("\n".join(vocabulary()) + "\n")
  with open(os.path.join(out, "synthetic.json"), "w") as f:
    json.dump(params, f, indent=1)
  result = paths(out)
  if verbose:
    print(f"[synthetic] {num_train} train + {num_eval} eval clips ({frames}x{resolution}^2) in "
          f"{out} in {time.time() - t0:.1f}s; set data.train={result['train']} "
          f"data.eval={result['eval']} data.tokenizer={result['tokenizer']}")
  return result


def paths(out: str) -> dict:
  return {"train": os.path.join(out, "train-*.tfrecord"),
          "eval": os.path.join(out, "eval-*.tfrecord"),
          "tokenizer": os.path.join(out, "vocab.txt")}


def ensure(out: str, **kwargs) -> dict:
  """Generates into `out` unless a dataset with the same parameters is already there."""
  meta = os.path.join(out, "synthetic.json")
  if os.path.isfile(meta):
    with open(meta) as f:
      have = json.load(f)
    want = dict(num_train=1024, num_eval=512, resolution=32, frames=8, seed=0, fps=8.0,
                distractors=0, caption_noise=0.0)
    want.update(kwargs)
    have.setdefault("distractors", 0)  # folders written before the options existed
    have.setdefault("caption_noise", 0.0)
    if all(have.get(k) == v for k, v in want.items()):
      return paths(out)
  return generate(out, **kwargs)


def define_flags(fv):
  """This command's flags, on the absl FlagValues `fv`."""
  from absl import flags
  flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
  flags.DEFINE_integer("train", 1024, "Train clips.", flag_values=fv)
  flags.DEFINE_integer("eval", 512, "Held-out clips (unique captions).", flag_values=fv)
  flags.DEFINE_integer("resolution", 32, "Square frame side in px.", flag_values=fv)
  flags.DEFINE_integer("frames", 8, "Stored frames per clip.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Random seed (the held-out split uses another).", flag_values=fv)
  flags.DEFINE_integer("distractors", 0, "Static shapes per clip that the caption does not "
                       "mention (a harder set).", flag_values=fv)
  flags.DEFINE_float("caption_noise", 0.0, "Fraction of train clips whose caption is replaced "
                     "by a random one, as web captions are often wrong (a harder set; the "
                     "held-out split stays clean).", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def run(a) -> int:
  try:
    generate(a.out, a.train, a.eval, a.resolution, a.frames, a.seed, distractors=a.distractors,
             caption_noise=a.caption_noise)
  except ValueError as e:  # generate's own checks of its parameters
    print(f"error: --{e}", file=sys.stderr)
    return 2
  return 0


# `main([...])` in-process (scripts, tests); `_cli()` for `python -m miles_jax.data.synthetic`.
main, _cli = cli.flag_command(define_flags, run, "python -m miles_jax.data.synthetic")


if __name__ == "__main__":
  _cli()
