"""Token ids appended after GPT-2's 50,257 (ids 0..50256; 50256 is <|endoftext|>) for the objectives
that need more than text: the shards never contain them, the objectives insert them.

- `PAD` (50257, "<pad>"): fills inputs and targets up to their fixed lengths, and is the decoder's start
  token (T5 starts its decoder with its pad id). A PAD in the targets is not a prediction: the loss skips it.
- Sentinels `<extra_id_0>` .. `<extra_id_99>` (50258 .. 50357): span corruption replaces the i-th noise span
  of an input by `<extra_id_i>` and the targets repeat it before the span's tokens (T5 §3.1.4). T5 has 100
  of them, as here; its SentencePiece vocabulary counts them down from its last id (<extra_id_0> is the
  last), while we append them after PAD and count up, so a model's vocabulary only ever grows at the end.
- BERT's `CLS` (50358, "[CLS]": first position, the NSP classifier reads it), `SEP` (50359, "[SEP]": after
  segment A and after segment B) and `MASK` (50360, "[MASK]": what masked language modelling puts in place
  of 80% of the predicted tokens), after the sentinels so that no earlier id moves. BERT's [PAD] is PAD.

An encoder-decoder config needs model.vocab_size >= SPAN_CORRUPTION_VOCAB_SIZE (50358), a BERT config
model.vocab_size >= BERT_VOCAB_SIZE (50361).
"""
from __future__ import annotations

EOT = 50256  # GPT-2's <|endoftext|>: between documents in the shards, and the EOS the objectives append
PAD = 50257  # the first id past GPT-2's vocabulary (trainer.config.GPT2_VOCAB_SIZE)
NUM_SENTINELS = 100
SENTINEL_0 = PAD + 1
SPAN_CORRUPTION_VOCAB_SIZE = SENTINEL_0 + NUM_SENTINELS  # 50358
CLS, SEP, MASK = SPAN_CORRUPTION_VOCAB_SIZE, SPAN_CORRUPTION_VOCAB_SIZE + 1, SPAN_CORRUPTION_VOCAB_SIZE + 2
BERT_VOCAB_SIZE = MASK + 1  # 50361

NAMES = {PAD: "<pad>", **{SENTINEL_0 + i: f"<extra_id_{i}>" for i in range(NUM_SENTINELS)},
         CLS: "[CLS]", SEP: "[SEP]", MASK: "[MASK]"}
