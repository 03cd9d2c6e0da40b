"""BERT's examples (trainer/masked_lm.py) from a data run, through the real loader: the share of the raw
tokens an example takes that it uses as A or IsNext B text, the share of its positions that are padding,
and the share of A's and B's positions predicted.

    PYTHONPATH=. python bench/masked_lm_tokens.py DATA_DIR [--seq-len 128 512] [--examples 5000]"""
from __future__ import annotations

import argparse

import numpy as np

from trainer.data import TrainLoader, load_manifest
from trainer.masked_lm import NOT_NEXT, MaskedLM
from trainer.special_tokens import BERT_VOCAB_SIZE, PAD, SEP


def measure(data, seq_len: int, examples: int) -> dict:
    objective = MaskedLM(seq_len, seed=0)
    loader = TrainLoader(data, objective, 100, 0, 1, 0, 2.0, "error", 0)
    used = padded = predicted = text = 0
    for _ in range(examples // 100):
        for row in loader.next().numpy():
            ids, labels = row[:seq_len], row[2 * seq_len:3 * seq_len]
            first, second = np.flatnonzero(ids == SEP)[:2]
            a, b = first - 1, second - first - 1
            used += a + (0 if row[-1] == NOT_NEXT else b)
            padded += int((ids == PAD).sum())
            predicted, text = predicted + int((labels >= 0).sum()), text + a + b
    n = examples // 100 * 100
    return {"seq_len": seq_len, "taken_tokens_used": used / (n * objective.window),
            "padding": padded / (n * seq_len), "predicted": predicted / text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--examples", type=int, default=5000)
    args = parser.parse_args()
    data = load_manifest(args.data_dir, BERT_VOCAB_SIZE)
    for seq_len in args.seq_len:
        r = measure(data, seq_len, args.examples)
        print(f"seq_len {r['seq_len']}: taken tokens used {r['taken_tokens_used']:.3f}, padding {r['padding']:.3f}, "
              f"predicted {r['predicted']:.4f}")


if __name__ == "__main__":
    main()
