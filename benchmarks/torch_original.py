"""The PyTorch original's train step, for timing next to miles_jax in the same run.

The structure follows the released code (m-bain/frozen-in-time `model/video_transformer.py`
and `model/model.py`, which TencentARC/MCQ's MILES builds on), written here from its
description, not copied:
- video: per-frame Conv2d patch embedding, cls token, tiled spatial + repeated temporal
  position tables, blocks `t = x + TimeAttn(LN3(x)); s = x + DropPath(SpaceAttn(LN1(t)));
  out = s + DropPath(MLP(LN2(s)))`, divided attention done the original's way: heads folded
  into the batch, the cls query attends to every key, patches are regrouped per frame (space)
  or per spatial position (time) with the cls key/value concatenated in front, two einsums and
  a softmax, then regrouped back;
- text: `transformers.DistilBertModel` built from a config (no download) in train mode, i.e.
  with its dropout (0.1) as `AutoModel.from_pretrained('distilbert-base-uncased').train()` has;
- projections `vid_proj = Linear`, `txt_proj = ReLU, Linear`; NormSoftmax contrastive loss
  (temperature 0.05); `torch.optim.AdamW`.

`miles_step` adds what MILES adds to that step: an EMA snapshot encoder's forward on the
intact clip (no grad), the online forward with masked patch embeddings replaced by a mask
token, a linear prediction head and smooth-L1 regression on the masked patches.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def _attend(q, k, v):
  """softmax(q k^T) v over [G, Lq, d] x [G, Lk, d] (q already scaled)."""
  return torch.einsum("gij,gjd->gid", torch.einsum("gid,gjd->gij", q, k).softmax(-1), v)


class DropPath(nn.Module):
  def __init__(self, rate: float):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class VarAttention(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.scale = (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, frames: int, mode: str):
    b, s, dim = x.shape
    h, d = self.heads, dim // self.heads
    n = (s - 1) // frames
    # [B, S, 3*D] -> three [(B h), S, d] with the heads folded into the batch.
    q, k, v = (y.reshape(b, s, h, d).transpose(1, 2).reshape(b * h, s, d)
               for y in self.qkv(x).chunk(3, dim=-1))
    q = q * self.scale
    cls_out = _attend(q[:, :1], k, v)
    if mode == "space":  # groups of one frame: [(B h f), n, d]
      group = lambda y: y[:, 1:].reshape(b * h * frames, n, d)
      reps = frames
    else:  # groups of one spatial position across frames: [(B h n), f, d]
      group = lambda y: y[:, 1:].reshape(b * h, frames, n, d).transpose(1, 2).reshape(
          b * h * n, frames, d)
      reps = n
    qg, kg, vg = group(q), group(k), group(v)
    cls_k = k[:, :1].repeat_interleave(reps, 0)
    cls_v = v[:, :1].repeat_interleave(reps, 0)
    out = _attend(qg, torch.cat([cls_k, kg], 1), torch.cat([cls_v, vg], 1))
    if mode == "space":
      out = out.reshape(b * h, frames * n, d)
    else:
      out = out.reshape(b * h, n, frames, d).transpose(1, 2).reshape(b * h, frames * n, d)
    out = torch.cat([cls_out, out], 1).reshape(b, h, s, d).transpose(1, 2).reshape(b, s, dim)
    return self.proj(out)


class Block(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = VarAttention(dim, heads)
    self.timeattn = VarAttention(dim, heads)
    self.drop_path = DropPath(drop_path)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    hidden = int(dim * mlp_ratio)
    self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
    self.norm3 = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x, frames: int):
    t = x + self.timeattn(self.norm3(x), frames, "time")
    s = x + self.drop_path(self.attn(self.norm1(t), frames, "space"))  # Frozen: residual is x
    return s + self.drop_path(self.mlp(self.norm2(s)))


class SpaceTimeTransformer(nn.Module):
  def __init__(self, vc):
    super().__init__()
    dim = vc.width
    self.num_patches = (vc.img_size // vc.patch_size) ** 2
    self.patch_embed = nn.Conv2d(3, dim, vc.patch_size, vc.patch_size)
    self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
    self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.num_patches + 1, dim))
    self.temporal_embed = nn.Parameter(0.02 * torch.randn(1, vc.num_frames, dim))
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # MILES: replaces masked patches
    rates = torch.linspace(0, vc.drop_path_rate, vc.depth).tolist()
    self.blocks = nn.ModuleList(Block(dim, vc.num_heads, vc.mlp_ratio, r) for r in rates)
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x, mask=None):
    """x [B, T, 3, H, W]; mask bool [B, T*N] or None -> final-LN tokens [B, 1+T*N, D]."""
    b, t = x.shape[:2]
    y = self.patch_embed(x.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B*T, N, D]
    y = y.reshape(b, t * self.num_patches, -1)
    if mask is not None:
      y = torch.where(mask[..., None], self.mask_token.to(y.dtype), y)
    pos = self.pos_embed[:, 1:].repeat(1, t, 1)
    tem = self.temporal_embed[:, :t].repeat_interleave(self.num_patches, 1)
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
    y = torch.cat([cls, y + pos + tem], 1)
    for blk in self.blocks:
      y = blk(y, t)
    return self.norm(y)


class FrozenInTime(nn.Module):
  """The dual encoder: SpaceTimeTransformer + DistilBERT + minimal projections."""

  def __init__(self, mc, text_dropout: float = 0.1):
    super().__init__()
    from transformers import DistilBertConfig, DistilBertModel
    tc = mc.text
    cfg = DistilBertConfig(vocab_size=tc.vocab_size, max_position_embeddings=tc.max_len,
                           dim=tc.width, n_layers=tc.depth, n_heads=tc.num_heads,
                           hidden_dim=tc.mlp_dim, dropout=text_dropout,
                           attention_dropout=text_dropout, attn_implementation="eager")
    self.video_model = SpaceTimeTransformer(mc.video)
    self.text_model = DistilBertModel(cfg)
    self.vid_proj = nn.Sequential(nn.Linear(mc.video.width, mc.proj_dim))
    self.txt_proj = nn.Sequential(nn.ReLU(), nn.Linear(tc.width, mc.proj_dim))

  def compute_video(self, frames, mask=None):
    tokens = self.video_model(frames, mask)
    return self.vid_proj(tokens[:, 0]), tokens

  def compute_text(self, ids, attention_mask):
    out = self.text_model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    return self.txt_proj(out[:, 0])


def norm_softmax_loss(t, v, temperature: float = 0.05):
  """Frozen's NormSoftmax over the cosine-similarity matrix, both directions."""
  sim = F.normalize(t, dim=-1, eps=1e-8) @ F.normalize(v, dim=-1, eps=1e-8).T / temperature
  return -(sim.log_softmax(1).diag().mean() + sim.log_softmax(0).diag().mean())


class Trainer:
  """One optimiser step of the original model, for `contrastive` or `miles`."""

  def __init__(self, mc, objective: str, lr: float = 1e-4, weight_decay: float = 0.05,
               grad_clip: float = 0.0, bf16: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    self.model = FrozenInTime(mc).train()
    self.objective = objective
    self.bf16 = bf16
    self.grad_clip = grad_clip
    params = list(self.model.parameters())
    if objective == "miles":
      dim = mc.video.width
      self.head = nn.Linear(dim, dim)
      params += list(self.head.parameters())
      self.snapshot = copy.deepcopy(self.model.video_model).requires_grad_(False)
    self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

  def step(self, batch: dict) -> float:
    frames = batch["frames"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
      t = self.model.compute_text(batch["input_ids"], batch["attention_mask"])
      if self.objective == "contrastive":
        v, _ = self.model.compute_video(frames)
        loss = norm_softmax_loss(t, v)
      else:
        with torch.no_grad():
          target = self.snapshot(frames)[:, 1:]
          target = F.layer_norm(target.float(), target.shape[-1:])
        v, tokens = self.model.compute_video(frames, batch["mvm_mask"])
        pred = self.head(tokens[:, 1:])
        m = batch["mvm_mask"]
        mvm = F.smooth_l1_loss(pred[m].float(), target[m])
        loss = norm_softmax_loss(t, v) + mvm
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.opt.step()
    if self.objective == "miles":  # EMA snapshot, m = 0.999
      with torch.no_grad():
        for ps, po in zip(self.snapshot.parameters(), self.model.video_model.parameters()):
          ps.mul_(0.999).add_(po.detach(), alpha=0.001)
    return float(loss.detach())

  @torch.no_grad()
  def encode_video(self, frames):
    self.model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
      out = self.model.compute_video(frames)[0]
    self.model.train()
    return out


def torch_batch(np_batch: dict) -> dict:
  """The JAX benchmark's uint8 [B,T,H,W,3] batch as the original feeds it: ImageNet-normalised
  float [B, T, 3, H, W]."""
  mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 1, 3, 1, 1)
  std = torch.tensor((0.229, 0.224, 0.225)).view(1, 1, 3, 1, 1)
  frames = torch.from_numpy(np_batch["frames"]).permute(0, 1, 4, 2, 3).float() / 255.0
  return {"frames": (frames - mean) / std,
          "input_ids": torch.from_numpy(np_batch["input_ids"]).long(),
          "attention_mask": torch.from_numpy(np_batch["attention_mask"]).long(),
          "mvm_mask": torch.from_numpy(np_batch["mvm_mask"]).bool()}
