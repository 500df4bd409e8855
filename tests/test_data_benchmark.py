"""benchmarks/input_pipeline.py --quick still runs and reports every figure."""
import importlib.util
import os

import pytest

PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "input_pipeline.py")


@pytest.mark.skipif(not os.path.exists(PATH), reason="benchmarks/ not in this checkout")
def test_input_pipeline_quick(capsys):
  spec = importlib.util.spec_from_file_location("b4_input_pipeline", PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  res = mod.main(["--quick", "--json", "--runs", "2"])
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1].startswith("{") and '"speedup_per_cpu_s"' in out[-1]
  assert res["tfrecord_clips_per_cpu_s"] > 0 and res["mp4_clips_per_cpu_s"] > 0
