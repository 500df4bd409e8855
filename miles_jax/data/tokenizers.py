"""In-graph text tokenizers: BERT WordPiece (vocab.txt) and sentencepiece (*.model).

`build_tokenizer(path, max_len).tokenize(strings)` -> (input_ids, attention_mask), int32 [B, L],
usable inside tf.data maps and eagerly on Python lists. WordPiece follows bert-base-uncased:
lower-case + accent stripping, punctuation split, `[CLS] ... [SEP]`, `[PAD]` after, truncation
keeps the first L-2 pieces.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text


class _Tokenizer:
  """Shared framing: pieces -> [bos] pieces[:L-2] [eos] + padding + attention mask."""

  def __init__(self, max_len: int, bos_id: int, eos_id: int, pad_id: int, vocab_size: int):
    if max_len < 3:
      raise ValueError(f"data.max_len={max_len} must be >= 3 ([CLS] + 1 token + [SEP])")
    self.max_len, self.bos_id, self.eos_id = max_len, bos_id, eos_id
    self.pad_id, self.vocab_size = pad_id, vocab_size

  def _pieces(self, strings: tf.Tensor) -> tf.RaggedTensor:
    raise NotImplementedError

  def tokenize(self, strings) -> tuple[tf.Tensor, tf.Tensor]:
    """strings: tf.string [B] or a list of str -> input_ids, attention_mask int32 [B, max_len]."""
    strings = tf.convert_to_tensor(strings, tf.string)
    pieces = self._pieces(tf.reshape(strings, [-1]))[:, :self.max_len - 2]
    batch = pieces.nrows()
    bos = tf.fill([batch, 1], tf.constant(self.bos_id, pieces.dtype))
    eos = tf.fill([batch, 1], tf.constant(self.eos_id, pieces.dtype))
    ids = tf.concat([bos, pieces, eos], axis=1)
    mask = tf.ones_like(ids)
    ids = ids.to_tensor(default_value=self.pad_id, shape=[None, self.max_len])
    mask = mask.to_tensor(default_value=0, shape=[None, self.max_len])
    return tf.cast(ids, tf.int32), tf.cast(mask, tf.int32)

  def tokenize_numpy(self, strings) -> tuple[np.ndarray, np.ndarray]:
    """Eager convenience: list of str -> numpy int32 arrays [B, max_len]."""
    ids, mask = self.tokenize(list(strings))
    return ids.numpy(), mask.numpy()


class WordPieceTokenizer(_Tokenizer):
  """bert-base-uncased conventions from a vocab.txt (one token per line, id = line number)."""

  def __init__(self, vocab_path: str, max_len: int, lower_case: bool = True):
    with tf.io.gfile.GFile(vocab_path) as f:
      vocab = [line.rstrip("\n") for line in f]
    index = {tok: i for i, tok in enumerate(vocab)}
    missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in index]
    if missing:
      raise ValueError(f"{vocab_path}: vocabulary lacks {missing}; data.tokenizer must be a BERT "
                       "vocab.txt with [PAD] [UNK] [CLS] [SEP]")
    super().__init__(max_len, index["[CLS]"], index["[SEP]"], index["[PAD]"], len(vocab))
    table = tf.lookup.StaticVocabularyTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(vocab), tf.range(len(vocab), dtype=tf.int64)), num_oov_buckets=1)
    # Normalisation is ours (below), as Hugging Face's BertTokenizer does it; tf_text's own
    # lower_case=True applies NFKC case folding, which rewrites `…` -> `...`, `ß` -> `ss`, `²` -> `2`.
    self._lower_case = lower_case
    self._bert = tf_text.BertTokenizer(table, lower_case=False, unknown_token="[UNK]",
                                       token_out_type=tf.int64)

  def _normalize(self, strings):
    """BERT's text cleaning: control and format characters (and NUL, U+FFFD) removed, tab /
    newline / line and paragraph separators made spaces; uncased: lower-case, NFD, marks
    (Mn) removed."""
    s = tf.strings.regex_replace(strings, r"[\t\n\r\p{Zs}\x{2028}\x{2029}]", " ")
    s = tf.strings.regex_replace(s, r"[\p{Cc}\p{Cf}\x{FFFD}]", "")
    if self._lower_case:
      s = tf_text.normalize_utf8(tf.strings.lower(s, encoding="utf-8"), "NFD")
      s = tf.strings.regex_replace(s, r"\p{Mn}", "")
    return s

  def _pieces(self, strings):
    pieces = self._bert.tokenize(self._normalize(strings))
    return pieces.merge_dims(-2, -1)  # [B, words, pieces] -> [B, pieces]


class SentencePieceTokenizer(_Tokenizer):
  """A sentencepiece model; its bos/eos play [CLS]/[SEP], its pad id (or 0) pads."""

  def __init__(self, model_path: str, max_len: int):
    import sentencepiece as spm  # only for reading the special ids
    with tf.io.gfile.GFile(model_path, "rb") as f:
      proto = f.read()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    bos, eos, pad = sp.bos_id(), sp.eos_id(), sp.pad_id()
    if bos < 0 or eos < 0:
      raise ValueError(f"{model_path}: sentencepiece model has no bos/eos piece; train it with "
                       "--bos_id and --eos_id set (they frame each caption like [CLS]/[SEP])")
    super().__init__(max_len, bos, eos, pad if pad >= 0 else 0, sp.get_piece_size())
    self._sp = tf_text.SentencepieceTokenizer(model=proto, out_type=tf.int32)

  def _pieces(self, strings):
    return self._sp.tokenize(strings)


def build_tokenizer(path: str, max_len: int) -> _Tokenizer:
  """vocab.txt -> WordPiece; *.model -> sentencepiece (config: data.tokenizer, data.max_len)."""
  if not path:
    raise ValueError("data.tokenizer is empty: set it to a BERT vocab.txt or a sentencepiece "
                     ".model (the synthetic dataset writes vocab.txt next to its shards)")
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"data.tokenizer={path} does not exist")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path, max_len)
  if os.path.basename(path).endswith(".txt"):
    return WordPieceTokenizer(path, max_len)
  raise ValueError(f"data.tokenizer={path}: use a vocab.txt (WordPiece) or a *.model "
                   "(sentencepiece)")
