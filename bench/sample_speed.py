"""Greedy decoding speed: our KV cache (`trainer.sample`), our model recomputing the whole sequence at
every step, and transformers' `generate` on the same weights exported as GPTNeoForCausalLM (the
`pretrain export hf` mapping of an alternating-attention GPT), same prompt, same machine. Prints tokens/s
and whether all three produce the same tokens. Random weights of a model config (default: GPT-3 125M).

    python bench/sample_speed.py [--model configs/model/gpt3-125m.yaml] [--prompt-tokens 32] [--new-tokens 128]
                                 [--threads 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from trainer.config import ModelConfig
from trainer.model import GPT, hf_neo
from trainer.sample import generate

REPO = Path(__file__).resolve().parent.parent


def recompute(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids], device=model.lm_head.weight.device)).logits[0, -1].argmax()))
    return ids[len(prompt):]


def timed(fn) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "configs/model/gpt3-125m.yaml"))
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPTNeoForCausalLM

    cfg = ModelConfig(**yaml.safe_load(Path(args.model).read_text()))
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    theirs = GPTNeoForCausalLM(hf_neo.hf_config(cfg, cfg.vocab_size - 1)).eval()
    theirs.load_state_dict(hf_neo.to_hf_state_dict(ours), strict=True)
    ours, theirs = ours.to(args.device), theirs.to(args.device)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1))
    n = args.new_tokens
    runs = {
        "ours, KV cache": lambda: generate(ours, prompt.tolist(), n),
        "ours, recomputing every step": lambda: recompute(ours, prompt.tolist(), n),
        "transformers GPT-Neo generate": lambda: theirs.generate(
            prompt[None].to(args.device), do_sample=False, max_new_tokens=n, min_new_tokens=n,
            pad_token_id=0)[0, args.prompt_tokens:].tolist(),
    }
    print(f"{Path(args.model).name}: {args.prompt_tokens}-token prompt, {n} new tokens, {args.device}, "
          f"{torch.get_num_threads()} threads")
    tokens = {}
    for name, fn in runs.items():
        tokens[name], seconds = timed(fn)
        print(f"  {name:<32} {n / seconds:8.1f} tokens/s  ({seconds:.2f} s)")
    print(f"  same tokens: {len({tuple(t) for t in tokens.values()}) == 1}")


if __name__ == "__main__":
    main()
