"""Retrieval metrics against hand-derived values and an independent brute-force loop."""
import numpy as np
import pytest

from miles_jax.evaluation import retrieval

KEYS = [f"{d}_{m}" for d in ("t2v", "v2t") for m in ("R1", "R5", "R10", "R50", "MdR", "MnR")]


def _brute_force(sim, t2v):
  """Ranks from explicit descending orderings, one query at a time (1-based)."""
  num_texts, num_videos = sim.shape
  t_ranks = []
  for i in range(num_texts):
    order = sorted(range(num_videos), key=lambda j: -sim[i, j])
    positions = [p + 1 for p, j in enumerate(order) if sim[i, j] == sim[i, t2v[i]]]
    t_ranks.append(min(positions))  # optimistic
  v_ranks = []
  for v in range(num_videos):
    order = sorted(range(num_texts), key=lambda i: -sim[i, v])
    best = np.inf
    for c in (i for i in range(num_texts) if t2v[i] == v):
      positions = [p + 1 for p, i in enumerate(order) if sim[i, v] == sim[c, v]]
      best = min(best, sum(positions) / len(positions))  # averaged over the tie group
    v_ranks.append(best)

  def summary(ranks, d):
    r = np.array(ranks, dtype=float)
    out = {f"{d}_R1": 100 * np.mean(r == 1)}
    for k in (5, 10, 50):
      out[f"{d}_R{k}"] = 100 * np.mean(r < k + 1)
    out[f"{d}_MdR"], out[f"{d}_MnR"] = np.median(r), np.mean(r)
    return out

  return {**summary(t_ranks, "t2v"), **summary(v_ranks, "v2t")}


def _assert_metrics(got, want):
  for k, v in want.items():
    assert got[k] == pytest.approx(v), k


def test_perfect_ranking():
  m = retrieval.retrieval_metrics(np.eye(5) + 0.1, np.arange(5))
  _assert_metrics(m, {"t2v_R1": 100, "t2v_MdR": 1, "t2v_MnR": 1,
                      "v2t_R1": 100, "v2t_MdR": 1, "v2t_MnR": 1})
  assert set(KEYS) <= set(m) and (m["num_texts"], m["num_videos"]) == (5, 5)


def test_reversed_ranking():
  n = 6
  i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  sim = ((j - i) % n) / n  # the ground truth (j == i) scores lowest, no ties
  m = retrieval.retrieval_metrics(sim, np.arange(n))
  _assert_metrics(m, {"t2v_R1": 0, "t2v_R5": 0, "t2v_R10": 100, "t2v_MdR": n, "t2v_MnR": n,
                      "v2t_R1": 0, "v2t_R5": 0, "v2t_MdR": n, "v2t_MnR": n})


def test_constant_similarity_ties():
  # The original's known pathology: t2v (optimistic) says perfect, v2t (averaged) says chance.
  m = retrieval.retrieval_metrics(np.zeros((4, 4)), np.arange(4))
  _assert_metrics(m, {"t2v_R1": 100, "t2v_MdR": 1, "t2v_MnR": 1,
                      "v2t_R1": 0, "v2t_R5": 100, "v2t_MdR": 2.5, "v2t_MnR": 2.5})


def test_partial_ties_by_hand():
  sim = np.array([[0.5, 0.5, 0.1],    # text 0 (video 0): tied with video 1 -> t2v rank 1
                  [0.9, 0.2, 0.2],    # text 1 (video 1): below 0.9, tied with 0.2 -> rank 2
                  [0.3, 0.3, 0.3]])   # text 2 (video 2): all tied -> rank 1
  np.testing.assert_array_equal(retrieval.t2v_ranks(sim, np.arange(3)), [0, 1, 0])
  # v2t: video 0 column [0.5, 0.9, 0.3]: caption 0 is 2nd -> 1 (0-based).
  # video 1 column [0.5, 0.2, 0.3]: caption 1 is 3rd -> 2.
  # video 2 column [0.1, 0.2, 0.3]: caption 2 is 1st -> 0.
  np.testing.assert_array_equal(retrieval.v2t_ranks(sim, np.arange(3)), [1, 2, 0])
  sim2 = np.array([[0.7, 0.1], [0.7, 0.2], [0.7, 0.3]])  # video 0: its caption tied 3 ways
  np.testing.assert_array_equal(retrieval.v2t_ranks(sim2, np.array([0, 1, 1])), [1, 0])


def test_multi_caption_best_caption():
  # Videos 0 and 1 with captions {0, 1, 2} and {3, 4}.
  t2v = np.array([0, 0, 0, 1, 1])
  sim = np.array([[0.1, 0.9],
                  [0.8, 0.2],
                  [0.3, 0.4],
                  [0.9, 0.5],
                  [0.2, 0.1]])
  np.testing.assert_array_equal(retrieval.t2v_ranks(sim, t2v), [1, 0, 1, 1, 1])
  # Video 0's column, descending: text3 0.9, text1 0.8, text2 0.3, text4 0.2, text0 0.1;
  # its best caption (text 1) is 2nd. Video 1: text0 0.9, text3 0.5 -> 2nd.
  np.testing.assert_array_equal(retrieval.v2t_ranks(sim, t2v), [1, 1])
  m = retrieval.retrieval_metrics(sim, t2v)
  _assert_metrics(m, {"t2v_R1": 20, "t2v_MnR": 1.8, "v2t_R1": 0, "v2t_R5": 100,
                      "v2t_MdR": 2})


@pytest.mark.parametrize("seed", [0, 1])
def test_random_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  num_videos = 60
  caps = rng.integers(1, 4, num_videos)  # 1-3 captions per video, like MSVD in miniature
  t2v = np.repeat(np.arange(num_videos), caps)
  rng.shuffle(t2v)  # captions need not be grouped
  sim = rng.integers(0, 8, (t2v.size, num_videos)) / 8.0  # coarse values: many ties
  _assert_metrics(retrieval.retrieval_metrics(sim, t2v), _brute_force(sim, t2v))


def test_cosine_similarity():
  rng = np.random.default_rng(0)
  t, v = rng.normal(size=(3, 8)), rng.normal(size=(4, 8))
  want = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in v] for a in t])
  np.testing.assert_allclose(retrieval.cosine_similarity(t, v), want, rtol=1e-5, atol=1e-6)
  # A zero vector gives similarity 0, not NaN.
  assert np.all(retrieval.cosine_similarity(np.zeros((1, 8)), v) == 0)


def test_chance_metrics_match_monte_carlo():
  rng = np.random.default_rng(0)
  t2v = np.repeat(np.arange(10), [1, 2, 3, 1, 2, 3, 1, 2, 3, 2])
  exact = retrieval.chance_metrics(t2v.size, 10, t2v)
  runs = [retrieval.retrieval_metrics(rng.random((t2v.size, 10)), t2v) for _ in range(400)]
  for k in ("t2v_R1", "t2v_R5", "t2v_MnR", "v2t_R1", "v2t_R5", "v2t_MnR"):
    assert np.mean([r[k] for r in runs]) == pytest.approx(exact[k], rel=0.06), k
  square = retrieval.chance_metrics(1000, 1000)
  assert square["t2v_R1"] == pytest.approx(0.1) and square["v2t_R10"] == pytest.approx(1.0)
  assert square["t2v_MdR"] == square["v2t_MdR"] == 500.5


def test_flatten_captions_and_table():
  texts, t2v = retrieval.flatten_captions([["a", "b"], ["c"]])
  assert texts == ["a", "b", "c"] and list(t2v) == [0, 0, 1]
  m = retrieval.retrieval_metrics(np.eye(3), np.arange(3))
  table = retrieval.format_table({"model": m, "random": retrieval.chance_metrics(3, 3)},
                                 "MSR-VTT 1k-A")
  assert table.splitlines()[0] == "MSR-VTT 1k-A"
  assert "R@10" in table and "100.0" in table and "33.3" in table


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="text_to_video"):
    retrieval.retrieval_metrics(np.zeros((3, 2)), np.arange(2))
  with pytest.raises(ValueError, match="no caption"):
    retrieval.retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]))
  with pytest.raises(ValueError, match="NaN"):
    retrieval.retrieval_metrics(np.full((2, 2), np.nan), np.arange(2))


# ---- options the papers compare with (issue 12 item 5), against loops written out here ----

def _multi_caption_case(seed=0, num_videos=7):
  rng = np.random.default_rng(seed)
  t2v = np.concatenate([np.arange(num_videos), rng.integers(0, num_videos, 9)])
  rng.shuffle(t2v)
  return rng.normal(size=(len(t2v), num_videos)), t2v


def test_v2t_max_over_captions_clip4clip_convention():
  sim, t2v = _multi_caption_case()
  num_videos = sim.shape[1]
  want = []
  for v in range(num_videos):  # video v queries the caption sets; a set scores its max
    scores = [max(sim[c, v] for c in range(len(t2v)) if t2v[c] == g) for g in range(num_videos)]
    want.append(sum(s > scores[v] for s in scores))
  np.testing.assert_array_equal(retrieval.v2t_ranks_max(sim, t2v), want)
  m = retrieval.retrieval_metrics(sim, t2v, v2t_mode="max")
  assert m["v2t_MnR"] == pytest.approx(np.mean(want) + 1)
  # differs from Frozen's convention (rank among all 16 captions) on this case
  assert m["v2t_MnR"] != retrieval.retrieval_metrics(sim, t2v)["v2t_MnR"]
  with pytest.raises(ValueError, match="v2t_mode"):
    retrieval.retrieval_metrics(sim, t2v, v2t_mode="mean")


def test_dual_softmax_against_loops():
  sim, _ = _multi_caption_case(1)
  temp = 0.05
  want0, want1 = np.zeros_like(sim), np.zeros_like(sim)
  for i in range(sim.shape[0]):
    for j in range(sim.shape[1]):
      want0[i, j] = sim[i, j] * np.exp(sim[i, j] / temp) / sum(
          np.exp(sim[k, j] / temp) for k in range(sim.shape[0]))
      want1[i, j] = sim[i, j] * np.exp(sim[i, j] / temp) / sum(
          np.exp(sim[i, k] / temp) for k in range(sim.shape[1]))
  np.testing.assert_allclose(retrieval.dual_softmax(sim, temp, 0), want0, rtol=1e-10)
  np.testing.assert_allclose(retrieval.dual_softmax(sim, temp, 1), want1, rtol=1e-10)


def test_qb_norm_against_loops():
  rng = np.random.default_rng(3)
  sim = rng.uniform(-1, 1, (12, 6))
  bank = rng.uniform(-1, 1, (3, 6))  # activation set: at most 3 of the 6 candidates
  beta, k = 5.0, 1
  active = set()
  for row in bank:  # each bank query's top-k candidates
    active |= set(np.argsort(-row)[:k].tolist())
  norm = [sum(np.exp(beta * bank[q, j]) for q in range(len(bank))) for j in range(6)]
  want = sim.copy()
  for i, row in enumerate(sim):
    if int(np.argmax(row)) in active:
      want[i] = [np.exp(beta * row[j]) / norm[j] for j in range(6)]
  got = retrieval.qb_norm(sim, bank, beta, k)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert 0 < sum(int(np.argmax(r)) in active for r in sim) < 12  # both branches exercised
