"""A PyTorch dual encoder with the released MILES / Frozen-in-Time semantics and key layout.

Written for the parity tests from the papers' description and the original's behaviour
(divided attention with the cls rule, the Frozen residual, tiled position tables, DistilBERT
post-LN blocks); it is deliberately a different code path from the Flax model (torch ops,
per-group loops over the token layout) so that agreement means something.
"""
import math

import torch
from torch import nn


class RefVarAttention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, frames, mode):
    b, s, d = x.shape
    h, hd = self.heads, d // self.heads
    q, k, v = self.qkv(x).chunk(3, dim=-1)
    split = lambda y: y.reshape(b, s, h, hd).permute(0, 2, 1, 3)  # [B, H, S, hd]
    q, k, v = split(q) * hd ** -0.5, split(k), split(v)
    out = torch.zeros_like(q)
    n = (s - 1) // frames
    # cls attends to all tokens
    out[:, :, :1] = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2), -1) @ v
    # each patch: cls + its group (same frame for space, same spatial index for time)
    for t in range(frames):
      for p in range(n):
        i = 1 + t * n + p
        if mode == "space":
          group = [1 + t * n + j for j in range(n)]
        else:
          group = [1 + f * n + p for f in range(frames)]
        idx = torch.tensor([0] + group)
        w = torch.softmax(q[:, :, i:i + 1] @ k[:, :, idx].transpose(-1, -2), -1)
        out[:, :, i:i + 1] = w @ v[:, :, idx]
    out = out.permute(0, 2, 1, 3).reshape(b, s, d)
    return self.proj(out)


class RefMlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x)))


class RefBlock(nn.Module):
  def __init__(self, dim, heads, mlp_ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = RefVarAttention(dim, heads)
    self.timeattn = RefVarAttention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = RefMlp(dim, int(dim * mlp_ratio))
    self.norm3 = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x, frames):
    time_res = x + self.timeattn(self.norm3(x), frames, "time")
    space_res = x + self.attn(self.norm1(time_res), frames, "space")  # residual is x
    return space_res + self.mlp(self.norm2(space_res))


class RefPatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)


class RefVideo(nn.Module):
  def __init__(self, img, patch, frames, dim, depth, heads, mlp_ratio):
    super().__init__()
    self.num_patches = (img // patch) ** 2
    self.patch_embed = RefPatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches + 1, dim))
    self.temporal_embed = nn.Parameter(torch.randn(1, frames, dim))
    self.blocks = nn.ModuleList(RefBlock(dim, heads, mlp_ratio) for _ in range(depth))
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x):  # x: [B, T, 3, H, W]
    b, t = x.shape[:2]
    y = self.patch_embed.proj(x.flatten(0, 1))  # [B*T, D, h, w]
    y = y.flatten(2).transpose(1, 2).reshape(b, t * self.num_patches, -1)
    pos = self.pos_embed[:, 1:].repeat(1, t, 1)
    tem = self.temporal_embed[:, :t].repeat_interleave(self.num_patches, 1)
    y = y + pos + tem
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
    y = torch.cat([cls, y], 1)
    for blk in self.blocks:
      y = blk(y, t)
    return self.norm(y)[:, 0]


class RefTextAttention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.q_lin, self.k_lin = nn.Linear(dim, dim), nn.Linear(dim, dim)
    self.v_lin, self.out_lin = nn.Linear(dim, dim), nn.Linear(dim, dim)

  def forward(self, x, mask):
    b, l, d = x.shape
    hd = d // self.heads
    split = lambda y: y.view(b, l, self.heads, hd).transpose(1, 2)
    q = split(self.q_lin(x)) / math.sqrt(hd)
    scores = q @ split(self.k_lin(x)).transpose(2, 3)
    scores = scores.masked_fill((mask == 0).view(b, 1, 1, l), torch.finfo(scores.dtype).min)
    ctx = torch.softmax(scores, -1) @ split(self.v_lin(x))
    return self.out_lin(ctx.transpose(1, 2).reshape(b, l, d))


class RefFFN(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.lin2(nn.functional.gelu(self.lin1(x)))


class RefTextLayer(nn.Module):
  def __init__(self, dim, heads, hidden):
    super().__init__()
    self.attention = RefTextAttention(dim, heads)
    self.sa_layer_norm = nn.LayerNorm(dim, eps=1e-12)
    self.ffn = RefFFN(dim, hidden)
    self.output_layer_norm = nn.LayerNorm(dim, eps=1e-12)

  def forward(self, x, mask):
    x = self.sa_layer_norm(self.attention(x, mask) + x)
    return self.output_layer_norm(self.ffn(x) + x)


class RefEmbeddings(nn.Module):
  def __init__(self, vocab, max_len, dim):
    super().__init__()
    self.word_embeddings = nn.Embedding(vocab, dim)
    self.position_embeddings = nn.Embedding(max_len, dim)
    self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
    self.register_buffer("position_ids", torch.arange(max_len)[None])  # as older HF saves it

  def forward(self, ids):
    pos = self.position_ids[:, :ids.shape[1]]
    return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class RefTransformer(nn.Module):
  def __init__(self, depth, dim, heads, hidden):
    super().__init__()
    self.layer = nn.ModuleList(RefTextLayer(dim, heads, hidden) for _ in range(depth))


class RefText(nn.Module):
  def __init__(self, vocab, max_len, dim, depth, heads, hidden):
    super().__init__()
    self.embeddings = RefEmbeddings(vocab, max_len, dim)
    self.transformer = RefTransformer(depth, dim, heads, hidden)

  def forward(self, ids, mask):
    x = self.embeddings(ids)
    for layer in self.transformer.layer:
      x = layer(x, mask)
    return x


class RefDualEncoder(nn.Module):
  """`module.`-less keys: video_model.*, text_model.*, vid_proj.0.*, txt_proj.1.*"""

  def __init__(self, mc):
    super().__init__()
    v, t = mc.video, mc.text
    self.video_model = RefVideo(v.img_size, v.patch_size, v.num_frames, v.width, v.depth,
                                v.num_heads, v.mlp_ratio)
    self.text_model = RefText(t.vocab_size, t.max_len, t.width, t.depth, t.num_heads, t.mlp_dim)
    self.vid_proj = nn.Sequential(nn.Linear(v.width, mc.proj_dim))
    self.txt_proj = nn.Sequential(nn.ReLU(), nn.Linear(t.width, mc.proj_dim))

  def encode_video(self, frames_bthwc):
    return self.vid_proj(self.video_model(frames_bthwc.permute(0, 1, 4, 2, 3)))

  def encode_text(self, ids, mask):
    return self.txt_proj(self.text_model(ids, mask)[:, 0])


def randomize_(module, seed=0):
  """Random values in every parameter (no zero-init left), LayerNorms around 1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("weight") and ("norm" in name.lower()):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
  return module
