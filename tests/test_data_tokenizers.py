"""tokenizers.py against hand-computed WordPiece ids and the sentencepiece library."""
import numpy as np
import pytest
import tensorflow as tf

from miles_jax.data import tokenizers

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "##s", "play", "##ing",
         ",", "!", "cafe", "a", "dog"]


@pytest.fixture
def vocab_path(tmp_path):
  p = tmp_path / "vocab.txt"
  p.write_text("\n".join(VOCAB) + "\n")
  return str(p)


def test_wordpiece_hand_computed(vocab_path):
  tok = tokenizers.build_tokenizer(vocab_path, max_len=12)
  ids, mask = tok.tokenize_numpy(["The cats, playing!", "Café dog zebra", ""])
  # [CLS] the cat ##s , play ##ing ! [SEP]
  np.testing.assert_array_equal(ids[0], [2, 5, 6, 7, 10, 8, 9, 11, 3, 0, 0, 0])
  np.testing.assert_array_equal(mask[0], [1] * 9 + [0] * 3)
  # lower-cased, accent stripped (bert-base-uncased); unknown word -> [UNK]
  np.testing.assert_array_equal(ids[1], [2, 12, 14, 1, 3] + [0] * 7)
  np.testing.assert_array_equal(ids[2], [2, 3] + [0] * 10)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 12)


def test_wordpiece_truncates_keeping_sep(vocab_path):
  tok = tokenizers.build_tokenizer(vocab_path, max_len=5)
  ids, mask = tok.tokenize_numpy(["the cat the dog a"])
  np.testing.assert_array_equal(ids[0], [2, 5, 6, 5, 3])
  assert mask.sum() == 5


def test_in_graph(vocab_path):
  tok = tokenizers.build_tokenizer(vocab_path, max_len=8)
  ds = tf.data.Dataset.from_tensor_slices(["a dog", "the cats"]).batch(2).map(tok.tokenize)
  ids, mask = next(iter(ds))
  np.testing.assert_array_equal(ids.numpy(), [[2, 13, 14, 3, 0, 0, 0, 0],
                                              [2, 5, 6, 7, 3, 0, 0, 0]])
  assert ids.shape == (2, 8)


def test_sentencepiece(tmp_path):
  import sentencepiece as spm
  text = tmp_path / "text.txt"
  text.write_text("\n".join(["a red square moves left", "a blue circle grows",
                             "a green triangle appears then a red circle shrinks"] * 20))
  prefix = str(tmp_path / "sp")
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=prefix, vocab_size=17,
                                 model_type="word", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                 minloglevel=2)
  tok = tokenizers.build_tokenizer(prefix + ".model", max_len=10)
  ids, mask = tok.tokenize_numpy(["a red circle grows", "a blue square moves left then"])
  sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
  for row, m, s in zip(ids, mask, ["a red circle grows", "a blue square moves left then"]):
    want = [2] + sp.encode(s)[:8] + [3]
    np.testing.assert_array_equal(row[:len(want)], want)
    assert (row[len(want):] == 0).all() and m.sum() == len(want)


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="data.tokenizer is empty"):
    tokenizers.build_tokenizer("", 8)
  with pytest.raises(FileNotFoundError, match="data.tokenizer"):
    tokenizers.build_tokenizer(str(tmp_path / "nope.txt"), 8)
  bad = tmp_path / "vocab.txt"
  bad.write_text("a\nb\n")
  with pytest.raises(ValueError, match=r"\[CLS\]"):
    tokenizers.build_tokenizer(str(bad), 8)
