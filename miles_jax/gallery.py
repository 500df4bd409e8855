"""Static results pages: for each text query its top-k clips as strips of the sampled frames.

One self-contained HTML file (every image is a data: URI, no script or style from elsewhere), so
it opens from the file system with no server and no network. Written by
`python -m miles_jax.search --html` (an embedding index) and by `python -m miles_jax.evaluate`
(held-out queries, the correct clip marked: WORKDIR/gallery.html). Each
clip also plays as a short loop of its frames beside the strip (CSS only).

A script at the end of the page records, per query, how many results it shows, how many of
their images decoded (naturalWidth > 0) and the page's scroll width in a hidden
`<pre id="render-check">` (JSON, never shown), for headless tests. Strips scale down to the
window, so the page fits 1280 px without horizontal scrolling.
"""
from __future__ import annotations

import base64
import html

import numpy as np

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222;
 max-width:1400px;overflow-wrap:anywhere}
h1{font-size:1.3em} .meta{color:#666;font-size:.85em}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em}
h2{font-size:1.05em;margin:.2em 0 .6em} .q{font-style:italic}
ol{list-style:none;padding:0;margin:0}
li{display:flex;align-items:center;gap:.8em;padding:.25em 0;border-top:1px solid #f0f0f0}
li.correct{background:#e6f6e6;outline:2px solid #3a3}
.rank{width:2.2em;text-align:right;color:#888;flex:none}
.score{width:4.5em;font-variant-numeric:tabular-nums;flex:none}
.name{font-size:.85em;word-break:break-all;flex:1;min-width:6em}
.tag{color:#181;font-weight:bold;font-size:.85em;flex:none}
.strip{height:auto;max-height:var(--h);max-width:calc(100vw - var(--w) - 22em);min-width:0;
 display:block;flex:0 1 auto;border:1px solid #ccc}
.loop{width:var(--w);height:var(--h);flex:none;border:1px solid #ccc;background-repeat:no-repeat;
 background-size:auto 100%;animation:frames var(--dur) steps(var(--n)) infinite}
@keyframes frames{from{background-position-x:0}to{background-position-x:calc(-1*var(--n)*var(--w))}}
"""

_CHECK_JS = """
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('section.query').forEach(function (s) {
    var imgs = s.querySelectorAll('li.result img');
    var loaded = 0;
    imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) loaded++; });
    out.push({query: s.dataset.query, results: s.querySelectorAll('li.result').length,
              images: imgs.length, loaded: loaded,
              correct: s.querySelectorAll('li.result.correct').length,
              page_width: document.documentElement.scrollWidth});
  });
  document.getElementById('render-check').textContent = JSON.stringify(out);
});
"""


def data_uri(jpeg: bytes) -> str:
  return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def strip_from_frames(frames: np.ndarray, height: int = 96) -> bytes:
  """uint8 [T, h, w, 3] -> one JPEG strip (see prepare.strip_jpeg)."""
  from miles_jax.data import prepare
  return prepare.strip_jpeg(frames, height)


def write_page(out: str, title: str, queries: list, subtitle: str = "",
               frames_per_clip: int = 4, thumb_height: int = 96) -> str:
  """Writes the page; `queries` = [{"query": str, "note": str (optional), "results": [{"rank",
  "score", "name", "jpeg" (strip bytes), "correct" (bool, optional), "title" (optional)}]}]."""
  h = html.escape
  w = thumb_height  # frames are square
  parts = [
      "<!DOCTYPE html><html><head><meta charset='utf-8'>",
      f"<title>{h(title)}</title><style>{_CSS}</style></head><body>",
      f"<h1>{h(title)}</h1>",
      f"<p class='meta'>{h(subtitle)}</p>" if subtitle else "",
  ]
  for qi, q in enumerate(queries):
    parts.append(f"<section class='query' id='q{qi}' data-query='{h(q['query'], quote=True)}'>"
                 f"<h2>{qi + 1}. <span class='q'>“{h(q['query'])}”</span></h2>")
    if q.get("note"):
      parts.append(f"<p class='meta'>{h(q['note'])}</p>")
    parts.append("<ol>")
    for r in q["results"]:
      cls = "result correct" if r.get("correct") else "result"
      tag = "<span class='tag'>✔ correct clip</span>" if r.get("correct") else ""
      n = int(r.get("frames", frames_per_clip))
      uri = data_uri(r["jpeg"])
      parts.append(
          f"<li class='{cls}' style='--w:{w}px;--h:{thumb_height}px;--n:{n};"
          f"--dur:{0.5 * n:.1f}s'><span class='rank'>{h(str(r['rank']))}</span>"
          f"<span class='score'>{float(r['score']):.4f}</span>"
          f"<img class='strip' alt='{h(r['name'], quote=True)}' src='{uri}'>"
          f"<div class='loop' title='the sampled frames as a loop' "
          f"style=\"background-image:url('{uri}')\"></div>"
          f"<span class='name' title='{h(r.get('title', r['name']), quote=True)}'>"
          f"{h(r['name'])}</span>{tag}</li>")
    parts.append("</ol></section>")
  parts.append(f"<pre id='render-check' hidden></pre><script>{_CHECK_JS}</script>")
  parts.append("</body></html>")
  from miles_jax import paths
  paths.write_text(out, "\n".join(p for p in parts if p))  # local or gs://, never half-written
  return out


def write_eval_gallery(evaluator, params, out: str, cache_dir: str | None = None,
                       params_fp: str | None = None, num_queries: int = 8, k: int = 5) -> str:
  """`evaluate`'s page: `num_queries` held-out captions (evenly spaced over the eval set), each
  with its top-k videos and the correct clip marked (appended with its rank when not in top-k).
  Uses the evaluator's verified embedding cache in `cache_dir` when it has this evaluation's."""
  from miles_jax.evaluation import search
  e = evaluator.eval_set
  text, video = evaluator.cached(params, cache_dir, params_fp)
  picks = np.unique(np.linspace(0, len(e.texts) - 1, min(num_queries, len(e.texts))).astype(int))
  kk = min(k, len(e.video_ids))
  q = search.normalize(np.asarray(text[picks], np.float32))
  g = search.normalize(np.asarray(video, np.float32))
  vals, idx = search.topk_search(q, g, kk)
  ranks = search.ground_truth_ranks(q, g, e.text_to_video[picks])
  row_of = {int(v): j for j, v in enumerate(e.clip_index)}  # video index -> local clip row
  gq = np.asarray(g)

  def result(rank, score, v, correct):
    return {"rank": rank, "score": score, "name": e.video_ids[v], "correct": correct,
            "jpeg": strip_from_frames(e.clips[row_of[int(v)]])}

  queries = []
  for j, t in enumerate(picks):
    gt = int(e.text_to_video[t])
    res = [result(r + 1, vals[j, r], int(idx[j, r]), int(idx[j, r]) == gt) for r in range(kk)]
    note = f"correct clip {e.video_ids[gt]} at rank {int(ranks[j])} of {len(e.video_ids)}"
    if gt not in idx[j] and gt in row_of:
      res.append(result(int(ranks[j]), float(np.asarray(q[j]) @ gq[gt]), gt, True))
    queries.append({"query": e.texts[t], "results": res, "note": note})
  hits = sum(int(r) == 1 for r in ranks)
  return write_page(out, "Held-out text→video retrieval",
                    queries, f"{len(picks)} held-out captions, top-{kk} of {len(e.video_ids)} "
                    f"clips; {hits} of {len(picks)} have the correct clip (green) first.",
                    frames_per_clip=e.clips.shape[1])
