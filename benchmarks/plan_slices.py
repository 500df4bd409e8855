"""The findings table of docs/plan.md: `python -m miles_jax.plan` for shipped configs x TPU slices.

    python benchmarks/plan_slices.py [--configs=configs/pretrain_miles.py:stage2,...] \
        [--topologies=v4-32,v5e-64,v5p-128,v6e-64] [--max_batch] [--set=model.scan_layers=True] \
        [--programs=train_4f]
    python benchmarks/plan_slices.py --table     # the markdown table from the results file

Each (config, slice) runs `plan --json` (one compile at a time; each compile in its own watched
child process) and is stored in benchmarks/results/plan.json under "CONFIG @ SLICE [overrides]",
so partial runs add up and a rerun replaces only its own rows. A plan that fails (does not fit,
runs out of host memory) is stored with its exit status and message.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "plan.json")
CONFIGS = ("configs/pretrain_miles.py:stage1", "configs/pretrain_miles.py:stage2",
           "configs/pretrain_mac.py:stage2", "configs/finetune_msrvtt.py")
TOPOLOGIES = ("v4-32", "v5e-64", "v5p-128", "v6e-64")


def key(config: str, topology: str, overrides: list[str], programs: str = "") -> str:
  return (f"{config} @ {topology}" + (f" [{' '.join(overrides)}]" if overrides else "")
          + (f" programs={programs}" if programs else ""))


def run_one(config: str, topology: str, overrides: list[str], max_batch: bool,
            programs: str = "") -> dict:
  cmd = [sys.executable, "-m", "miles_jax.plan", f"--config={config}", f"--topology={topology}",
         "--json", *(f"--config.{o}" for o in overrides)] + (["--max_batch"] if max_batch else [])
  cmd += [f"--programs={programs}"] if programs else []
  t0 = time.time()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  sys.stderr.write(r.stderr)
  out = {"command": "python -m miles_jax.plan " + " ".join(cmd[3:]), "exit_status": r.returncode,
         "wall_s": round(time.time() - t0, 1)}
  if r.stdout.strip().startswith("{"):
    out["report"] = json.loads(r.stdout.strip().splitlines()[-1])
  if r.returncode:
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    out["error"] = errors[-1] if errors else r.stderr.strip()[-300:]
  return out


def _gib(b: float) -> str:
  return f"{b / 2 ** 30:.1f}"


def table(results: dict) -> str:
  head = ("| config @ slice | program | batch | per chip GiB: args / temp / peak of HBM |"
          " fits | max batch | FLOPs per chip: compiler / analytic | roofline clips/s |"
          " hours at 40 % MFU | cost at 40 % MFU | collectives per step |")
  lines = [head, "|" + "---|" * 11]
  for k, v in results.items():
    rep = v.get("report")
    if rep is None:
      lines.append(f"| {k} | — | — | — | — | — | — | — | — | — | {v.get('error', '')} |")
      continue
    sched = rep.get("schedule", {})
    settings = rep.get("model_settings")
    label = k + (f" (remat {settings['remat']})" if settings and "model.remat=" not in k else "")
    for i, p in enumerate(rep["programs"]):
      m = p["memory"]
      colls = ", ".join(f"{n} {c['count']} ({c['bytes'] / 2 ** 20:.0f} MiB)"
                        for n, c in p["collectives"].items()) or "none"
      first = i == 0
      mb = rep.get("max_batch", "") if p["program"] == rep.get("max_batch_program") else ""
      ratio = f"{p['flops_ratio']:.2f}" if p.get("flops_ratio") else "n/a"
      lines.append(
          f"| {label if first else ''} | {p['program']} | {p['batch']} | {_gib(m['arguments'])} / "
          f"{_gib(m['temporaries'])} / {_gib(m['peak'])} of {_gib(p['hbm_bytes'])} | "
          f"{'yes' if p['fits'] else '**no**'} | {mb} | {p['flops'] / 1e12:.2f} T / "
          f"{(p['flops_analytic'] or 0) / 1e12:.2f} T ({ratio}) | "
          f"{p['clips_per_s_roofline']:.0f} | "
          + (f"{sched['hours_at_mfu']:.1f} h ({sched['name'].split(':')[0]})"
             if first and sched else "") + " | "
          + (f"${sched['usd_at_mfu']:,.0f}" if first and sched else "") + f" | {colls} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--configs", default=",".join(CONFIGS))
  ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
  ap.add_argument("--set", action="append", default=[],
                  help="FIELD=VALUE config override for every plan, e.g. model.scan_layers=True")
  ap.add_argument("--max_batch", action="store_true")
  ap.add_argument("--programs", default="", help="plan's --programs (e.g. train_4f): compile "
                  "only these of each config's programs")
  ap.add_argument("--out", default=DEFAULT_OUT)
  ap.add_argument("--table", action="store_true", help="only print the table of --out")
  a = ap.parse_args()
  results = {}
  if os.path.exists(a.out):
    with open(a.out) as f:
      results = json.load(f)
  if not a.table:
    for config in a.configs.split(","):
      for topo in a.topologies.split(","):
        k = key(config, topo, a.set, a.programs)
        print(f"plan {k} ...", file=sys.stderr, flush=True)
        results[k] = run_one(config, topo, a.set, a.max_batch, a.programs)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
          json.dump(results, f, indent=1, default=float)
  print(table(results))


if __name__ == "__main__":
  main()
