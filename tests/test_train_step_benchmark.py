"""benchmarks/train_step.py --quick runs JAX and the PyTorch original side by side (no timing
assertion: only that every figure of its table is produced, from this run)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


@pytest.mark.slow
def test_quick_both_frameworks_same_run():
  r = subprocess.run([sys.executable, os.path.join(BENCH, "train_step.py"), "--quick",
                      "--objectives=contrastive,miles", "--json"], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["cpu"] and out["torch_threads"] >= 1
  rows = {row["objective"]: row for row in out["rows"]}
  for name in ("contrastive", "miles"):
    row = rows[name]
    assert len(row["step_s_rounds"]) == len(row["torch_step_s_rounds"]) == out["rounds"]
    assert row["jax_over_torch"] == pytest.approx(row["step_s"] / row["torch_step_s"])
  assert rows["contrastive"]["video_forward_jax_over_torch"] > 0
  # No constant from another machine: the text never names a fixed PyTorch time.
  assert "7.07" not in open(os.path.join(BENCH, "train_step.py")).read()


@pytest.mark.slow
def test_no_torch_runs_where_torch_and_transformers_are_missing(tmp_path):
  """--no-torch works in an install without the [torch] / [test] extras: the JAX worker
  process gets the flag and never looks for torch / transformers (stand-in packages that fail
  to import simulate their absence); without the flag the run stops with one line naming it."""
  for name in ("torch", "transformers"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
  cmd = [sys.executable, os.path.join(BENCH, "train_step.py"), "--quick", "--rounds=1",
         "--runs=1", "--objectives=contrastive", "--matmul=64", "--json"]
  r = subprocess.run(cmd + ["--no-torch"], cwd=ROOT, capture_output=True, text=True, env=env,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  row = out["rows"][0]
  assert row["objective"] == "contrastive" and row["step_s"] > 0
  assert "torch_step_s" not in row and "torch_version" not in out
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 2 and "--no-torch" in r.stderr.strip().splitlines()[-1], r.stderr


def test_torch_original_divided_attention_matches_reference():
  """The benchmark's fast PyTorch attention computes the same divided rule as the slow
  per-group reference of the parity tests (so the baseline times the right work)."""
  sys.path.insert(0, BENCH)
  import torch_original
  import torch_reference
  torch.manual_seed(0)
  dim, heads, frames, n = 24, 3, 3, 4
  fast, ref = torch_original.VarAttention(dim, heads), torch_reference.RefVarAttention(dim, heads)
  ref.load_state_dict(fast.state_dict())
  x = torch.randn(2, 1 + frames * n, dim)
  for mode in ("space", "time"):
    np.testing.assert_allclose(fast(x, frames, mode).detach().numpy(),
                               ref(x, frames, mode).detach().numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_step_profile_quick_sums_to_the_step():
  """The per-kind JAX table covers the step's ops (nothing large left unclassified) and the
  PyTorch table comes from the same run."""
  r = subprocess.run([sys.executable, os.path.join(BENCH, "step_profile.py"), "--quick",
                      "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  kinds = {k["kind"]: k for k in out["jax"]["kinds"]}
  assert sum(k["pct"] for k in kinds.values()) == pytest.approx(100.0, abs=1e-6)
  for kind in ("space attention core", "time attention core", "space attention qkv/proj",
               "time attention qkv/proj", "video MLP", "text encoder",
               "optimizer / update"):
    assert kinds[kind]["ms"] > 0, kind
  assert kinds.get("other", {"pct": 0})["pct"] < 25
  assert sum(out["jax"]["dots"].values()) > 0 and out["torch"]["ops"]
  # run as a script, it profiles under the allocator tunables the train CLI uses (tiny: huge pages)
  assert out["malloc"].endswith("glibc.malloc.hugetlb=1"), out["malloc"]


@pytest.mark.slow
def test_step_profile_reads_every_dot_and_times_the_same_product_in_torch():
  """`step_profile.py --dots` finds every dot of an optimised module -- also the ones XLA put
  inside fusions -- with its operand shapes and contraction (their FLOPs add up to the
  function's) and the thunk that runs it; the einsum it times in PyTorch is the same product as
  XLA's dot_general for the dimension numbers XLA chose."""
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, BENCH)
  flags = os.environ.get("XLA_FLAGS")
  import step_profile  # pylint: disable=import-outside-toplevel
  if flags is None:  # its import turns on per-op trace events for a backend not yet started
    os.environ.pop("XLA_FLAGS", None)
  else:
    os.environ["XLA_FLAGS"] = flags

  def fn(a, b, c, x, w):
    att = jnp.tanh(jnp.einsum("bqd,bkd->bqk", a, b))
    return jnp.einsum("bqk,bkc->bqc", att, c).sum() + jnp.sum(jnp.maximum(x @ w.T, 0.0))
  shapes = [(3, 5, 4), (3, 6, 4), (3, 6, 2), (7, 8), (9, 8)]
  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
  compiled = jax.jit(fn).lower(*args).compile()
  dots = step_profile.step_dots(compiled.as_text())
  want_flops = 2 * (3 * 5 * 6 * 4 + 3 * 5 * 6 * 2 + 7 * 9 * 8)
  got_flops = 0
  instructions = {line.split(" = ")[0].strip().removeprefix("ROOT ").lstrip("%")
                  for line in compiled.as_text().splitlines() if " = " in line}
  for d in dots:
    (ld, ls), (rd, rs) = d["lhs"], d["rhs"]
    lb, lc, rb, rc = d["dims"]
    assert (ld, rd, d["out"]) == ("f32", "f32", "f32") and d["thunk"] in instructions
    free = [n for i, n in enumerate(ls) if i not in lb + lc] + [
        n for i, n in enumerate(rs) if i not in rb + rc]
    got_flops += 2 * int(np.prod([ls[i] for i in lb + lc])) * int(np.prod(free))
    a = rng.standard_normal(ls).astype(np.float32)
    b = rng.standard_normal(rs).astype(np.float32)
    want = jax.lax.dot_general(a, b, ((lc, rc), (lb, rb)))
    got = torch.einsum(step_profile.einsum_equation(d["dims"], len(ls), len(rs)),
                       torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert len(dots) == 3 and got_flops == want_flops


@pytest.mark.slow
def test_components_alternative_layouts_compute_divided_attention():
  """The attention layouts benchmarks/components.py --alternatives times against ours are the
  same arithmetic (so their times compare like with like), forward and gradients."""
  sys.path.insert(0, BENCH)
  import jax
  import jax.numpy as jnp
  import components
  from miles_jax.models import layers
  t, n, h, d = 3, 5, 2, 4
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 1 + t * n, h, d)), jnp.float32) for _ in range(3))
  for name, mode in (("time attention, broadcast-sum", "time"),
                     ("space attention, cls apart", "space")):
    alt = components.ALTERNATIVES[name]

    def loss(fn, q, k, v):
      return jnp.sum(jnp.sin(fn(q, k, v)))
    ours = lambda q, k, v, mode=mode: layers.divided_attention(q, k, v, t, mode)[0]
    np.testing.assert_allclose(jax.jit(alt, static_argnums=3)(q, k, v, t), jax.jit(ours)(q, k, v),
                               rtol=1e-5, atol=1e-6)
    g_alt = jax.jit(jax.grad(lambda *a: loss(lambda *b: alt(*b, t), *a), argnums=(0, 1, 2)))(q, k, v)
    g_ours = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_alt, g_ours):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
