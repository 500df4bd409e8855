"""The in-graph WordPiece tokenizer against Hugging Face's BertTokenizer / DistilBertTokenizer
built from the same vocab.txt (no download), on captions of the kinds real datasets hold:
punctuation, accents, digits, emoji, `…`, `ß`, control characters, CJK, long captions.
Needs the [test] extra (transformers). Differences that remain are listed in docs/data.md."""
import string

import numpy as np
import pytest

from miles_jax.data import tokenizers

transformers = pytest.importorskip("transformers", reason="needs the [test] extra")

MAX_LEN = 32
WORDS = ("a man woman person dog cat is are playing running cooking on in the of with and to "
         "street kitchen guitar video game car red blue two people dancing cafe naive resume "
         "strasse fussball hello world talking about news soccer 2020 3d 10 km h people's "
         "children play ball beach sunset timelapse drone shot").split()
PIECES = ("##s ##ing ##ed ##er ##ly ##a ##e ##i ##o ##u ##n ##t ##r ##l ##y").split()


def _vocab(path):
  chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation
                     + "¡¿«»€£°±×÷•…–—‘’“”ßæøðþ" + "日本語中文你好世界" + "é"))
  toks = (["[PAD]"] + [f"[unused{i}]" for i in range(5)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
          + chars + [f"##{c}" for c in chars if c.isalnum()] + WORDS + PIECES)
  seen, out = set(), []
  for t in toks:
    if t not in seen:
      seen.add(t)
      out.append(t)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
  return path


def _captions():
  rng = np.random.default_rng(0)
  extras = ["…", "ß", "Straße", "café", "naïve", "Résumé", "Ünïcödé", "🙂", "😀👍", "🎸",
            "\u200b", "\x07", "\t", "\u00a0", "\r\n", "日本語", "你好世界", "3.14", "10km/h",
            "$5", "50%", "#tag", "@user", "don't", "(a)", "[x]", "{y}", "a--b", "x_y", "e-mail",
            "¡hola!", "¿qué?", "«quote»", "“smart”", "‘single’", "—dash—", "2×3", "½", "°C",
            "\u0301", "A\u0301", "ﬁ", "Ⅻ", "²", "ǅ", "İstanbul", "ΑΒΓ", "Привет", "x\x00y",
            "\ufeff", "\u2028", "tab\there", "SHOUT", "MiXeD", "https://ex.com/a?b=c"]
  caps = []
  for i in range(300):
    n = int(rng.integers(1, 12 if i % 10 else 60))  # every tenth caption is long
    parts = []
    for _ in range(n):
      r = rng.random()
      parts.append(str(rng.choice(extras)) if r < 0.3 else
                   str(rng.choice(WORDS)).title() if r < 0.4 else str(rng.choice(WORDS)))
    sep = str(rng.choice([" ", " ", ", ", ". ", "  ", "!", "?"]))
    caps.append(sep.join(parts))
  return caps + ["", " ", "…", "ß", "\x07\x08", "🙂🙂🙂"]


@pytest.mark.parametrize("hf_class", ["BertTokenizer", "DistilBertTokenizer"])
def test_wordpiece_equals_hugging_face(tmp_path, hf_class):
  vocab = _vocab(str(tmp_path / "vocab.txt"))
  hf = getattr(transformers, hf_class)(vocab, do_lower_case=True)
  ours = tokenizers.build_tokenizer(vocab, MAX_LEN)
  caps = _captions()
  ids, mask = ours.tokenize_numpy(caps)
  want = hf(caps, max_length=MAX_LEN, truncation=True, padding="max_length")
  bad = [(c, ids[i][mask[i] > 0].tolist(), [x for x, m in zip(want["input_ids"][i],
                                                            want["attention_mask"][i]) if m])
         for i, c in enumerate(caps)
         if ids[i].tolist() != want["input_ids"][i] or mask[i].tolist() != want["attention_mask"][i]]
  assert not bad, f"{len(bad)} of {len(caps)} differ, e.g. {bad[:3]}"
