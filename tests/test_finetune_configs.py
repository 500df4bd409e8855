"""Fine-tuning recipes carry the upstream releases' hyperparameters, each with its source."""
import os
import re

import numpy as np
import pytest

from miles_jax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The upstream fine-tuning config, m-bain/frozen-in-time configs/msrvtt_4f_i21k.json (the fields
# that set hyperparameters; MILES's zero_msrvtt_4f_i21k_MILES.json repeats the optimizer and
# trainer blocks), and the transformers.AdamW defaults its train.py falls back to.
UPSTREAM = {
    "n_gpu": 4,  # DataParallel: batch_size below is the global batch
    "arch": {"args": {"video_params": {"num_frames": 4}}},
    "data_loader": {"args": {"batch_size": 16}},
    "optimizer": {"type": "AdamW", "args": {"lr": 3e-5}},
    "loss": {"type": "NormSoftmaxLoss", "args": {}},
    "trainer": {"epochs": 100, "max_samples_per_epoch": 9000},
}
HF_ADAMW_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0}
DISTILBERT_DROPOUT = 0.1


@pytest.mark.parametrize("dataset", ["msrvtt", "msvd", "lsmdc", "didemo"])
def test_finetune_config_is_the_upstream_recipe(dataset):
  import importlib.util
  path = os.path.join(ROOT, "configs", f"finetune_{dataset}.py")
  spec = importlib.util.spec_from_file_location(f"finetune_{dataset}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  up = UPSTREAM
  assert c.data.batch_size == up["data_loader"]["args"]["batch_size"]
  assert c.data.num_frames == up["arch"]["args"]["video_params"]["num_frames"]
  assert c.optim.lr == up["optimizer"]["args"]["lr"]
  assert (c.optim.b1, c.optim.b2) == HF_ADAMW_DEFAULTS["betas"]
  assert c.optim.eps == HF_ADAMW_DEFAULTS["eps"]
  assert c.optim.weight_decay == HF_ADAMW_DEFAULTS["weight_decay"]
  assert c.optim.grad_clip == 0 and c.optim.warmup_steps == 0  # none upstream
  assert c.optim.schedule == "constant"  # no lr_scheduler in the upstream config
  assert c.model.dtype == "float32" and c.model.text.dropout_rate == DISTILBERT_DROPOUT
  assert c.objectives == "contrastive" and c.temperature == 0.05
  steps_per_epoch = up["trainer"]["max_samples_per_epoch"] // up["data_loader"]["args"][
      "batch_size"] + 1
  assert c.train.steps == up["trainer"]["epochs"] * steps_per_epoch
  # and the optimizer built from it neither clips nor decays nor schedules
  tx, schedule = optim.make_optimizer(c)
  assert float(schedule(0)) == float(schedule(c.train.steps // 2)) == c.optim.lr
  import jax.numpy as jnp
  params = {"dense": {"kernel": jnp.ones((3, 3))}}
  state = tx.init(params)
  grads = {"dense": {"kernel": jnp.full((3, 3), 1e3)}}  # global norm 3000 >> any clip
  updates, _ = tx.update(grads, state, params)
  # first AdamW step without clipping or decay: -lr * g / (|g| + eps) = -lr per entry
  np.testing.assert_allclose(np.asarray(updates["dense"]["kernel"]), -c.optim.lr, rtol=1e-5)


def test_every_number_names_its_source():
  text = open(os.path.join(ROOT, "configs", "finetune_common.py")).read()
  body = text[text.index("def finetune_config"):]
  tags = ("[F-cfg]", "[F-train]", "[F-data]", "[M-cfg]", "[HF]", "loss.py", "deviation",
          "does not change", "upstream")
  for line in body.splitlines():
    m = re.match(r"\s+c\.(optim|data|train|model)\.[\w.]+(, c\.[\w.]+)* = ", line)
    if not m or "f\"data/" in line or "tokenizer" in line or "log_every" in line:
      continue
    assert any(t in line for t in tags) or "max_len" in line, line
  for ds in ("msvd", "lsmdc", "didemo"):
    assert "papers silent" in open(os.path.join(ROOT, "configs", f"finetune_{ds}.py")).read()
