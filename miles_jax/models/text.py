"""The text encoder: DistilBERT's structure (post-LN blocks, exact GELU, learned positions)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from miles_jax.models import layers

Dtype = Any


class TextAttention(nn.Module):
  num_heads: int
  dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None  # layers.dense's (None: dtype)
  kernels: str = "reference"  # model.kernels

  @nn.compact
  def __call__(self, x, attention_mask):
    b, l, width = x.shape
    h = self.num_heads
    dense = lambda name, axes: layers.dense(width, axes, name, self.dtype,
                                            kernel_init=layers.bert_init,
                                            matmul_dtype=self.matmul_dtype,
                                            kernels=self.kernels)
    split = lambda y: y.reshape(b, l, h, width // h)
    q = split(dense("q_lin", ("embed", "joined_kv"))(x)) * ((width // h) ** -0.5)
    k = split(dense("k_lin", ("embed", "joined_kv"))(x))
    v = split(dense("v_lin", ("embed", "joined_kv"))(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    keep = attention_mask[:, None, None, :].astype(bool)
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)  # as HF's masked_fill
    weights = layers.softmax(logits, self.kernels).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32)
    out = out.astype(v.dtype).reshape(b, l, width)
    return dense("out_lin", ("joined_kv", "embed"))(out)


class TextBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  eps: float
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None  # layers.dense's (None: dtype)
  kernels: str = "reference"  # model.kernels

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    drop = nn.Dropout(self.dropout_rate)
    x = layers.constrain_batch(x)
    a = TextAttention(self.num_heads, self.dtype, self.matmul_dtype, self.kernels,
                      name="attention")(
        x, attention_mask)
    x = layers.layer_norm(self.eps, "sa_layer_norm", self.dtype)(
        x + drop(a, deterministic=deterministic))
    f = layers.Mlp(self.mlp_dim, self.dtype, layers.bert_init, ("lin1", "lin2"),
                   self.matmul_dtype, self.kernels, name="ffn")(x)
    return layers.constrain_batch(layers.layer_norm(self.eps, "output_layer_norm", self.dtype)(
        x + drop(f, deterministic=deterministic)))


class TextEncoder(nn.Module):
  """int32 `[B, L]` token ids + attention mask -> token features `[B, L, D]` (post-LN)."""
  config: ml_collections.ConfigDict
  dtype: Dtype = jnp.float32
  remat: str = "none"  # none | full | dots_saveable (layers.maybe_remat)
  scan_layers: bool = False  # params `layers` [depth, ...] instead of layer_0..layer_{depth-1}
  matmul_dtype: Dtype | None = None  # the dense layers' operands (None: dtype)
  kernels: str = "reference"  # model.kernels: reference | xla_cpu (layers.py / xla_cpu.py)

  @nn.compact
  def __call__(self, input_ids, attention_mask, deterministic: bool = True):
    c = self.config
    l = input_ids.shape[1]
    if c.width % c.num_heads:
      raise ValueError(f"model.text: width={c.width} must divide by num_heads={c.num_heads}")
    if l > c.max_len:
      raise ValueError(f"text length {l} exceeds model.text.max_len={c.max_len}")
    emb = lambda name, rows, axes: nn.Embed(
        rows, c.width, dtype=self.dtype, name=name,
        embedding_init=nn.with_logical_partitioning(layers.bert_init, axes))
    x = emb("word_embeddings", c.vocab_size, ("vocab", "embed"))(input_ids)
    x = x + emb("position_embeddings", c.max_len, ("positions", "embed"))(jnp.arange(l)[None])
    x = layers.layer_norm(c.layer_norm_eps, "embeddings_LayerNorm", self.dtype)(x)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    block = layers.maybe_remat(TextBlock, self.remat, static_argnums=(3,))
    if self.scan_layers:
      x = layers.scan_blocks(block(c.num_heads, c.mlp_dim, c.layer_norm_eps, c.dropout_rate,
                                   self.dtype, self.matmul_dtype, self.kernels, name="layers"),
                             x, c.depth, attention_mask, deterministic)
    for i in range(0 if self.scan_layers else c.depth):
      x = block(c.num_heads, c.mlp_dim, c.layer_norm_eps, c.dropout_rate, self.dtype,
                self.matmul_dtype, self.kernels, name=f"layer_{i}")(x, attention_mask, deterministic)
    return x
