"""Generation: decoding with the KV cache gives the tokens and logits (< 1e-4) of recomputing the whole
sequence at every step, for every family (banded layers past their window, learned, sinusoidal and
relative positions at offsets, cross-attention projected once, Switch layers whose capacity binds in a full
pass); sampling is seeded, top-k 1 is greedy; `pretrain sample` prints the text and refuses bad requests."""
from __future__ import annotations

import pytest
import torch

from cluster.cli import main
from tests.trainer.conftest import make_run, train_in_process
from trainer.config import ModelConfig
from trainer.errors import TrainError
from trainer.model import model_for
from trainer.sample import Codec, decode_steps, generate, sample_checkpoint
from trainer.special_tokens import EOT, PAD

GPT = dict(n_layer=3, n_head=2, d_model=32, n_ctx=64, vocab_size=64)
T5 = dict(arch="encoder_decoder", n_layer=2, n_head=2, d_model=32, d_kv=8, d_ff=48, vocab_size=64, n_ctx=64,
          pos_embedding="relative", norm="rmsnorm", bias=False, attention_scaling=False, activation="relu",
          scale_decoder_output=True, init="t5", decoder_start_token_id=63, relative_buckets=8,
          relative_max_distance=16)
FAMILIES = {
    "dense": GPT,
    "alternating": dict(GPT, attention="alternating", local_window=5),  # 7 + 20 tokens cross the band
    "sinusoidal": dict(GPT, pos_embedding="sinusoidal"),
    # Capacity 0.5 x tokens / experts drops tokens in a full pass: decoding drops none (trainer/model/moe.py).
    "switch": dict(GPT, moe=dict(num_experts=4, eval_capacity_factor=0.5, every=1)),
    "t5": T5,
    "switch-t5": dict(T5, moe=dict(num_experts=4, routing_group="sequence", expert_capacity=1)),
    "vaswani": dict(arch="encoder_decoder", n_layer=2, n_head=2, d_model=32, d_ff=48, vocab_size=64, n_ctx=64,
                    pos_embedding="sinusoidal", norm_position="post", activation="relu", scale_embeddings=True),
}


def tiny_model(shape: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = model_for(ModelConfig(**shape)).eval()
    with torch.no_grad():  # larger biases and norms than at init, so positions and caches all matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def recompute(model, prompt: list[int], tokens: list[int], cache: bool) -> torch.Tensor:
    """The last position's logits from the whole sequence so far, with a fresh cache or none."""
    fresh = model.new_cache() if cache else None
    if model.cfg.arch == "encoder_decoder":
        decoder = torch.tensor([[model.cfg.decoder_start_token_id, *tokens]])
        return model(torch.tensor([prompt]), decoder_inputs=decoder, cache=fresh).logits[0, -1]
    return model(torch.tensor([prompt + tokens]), cache=fresh).logits[0, -1]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_kv_cache_decoding_equals_recomputation(family, temperature):
    model = tiny_model(FAMILIES[family])
    prompt = torch.randint(0, 63, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    steps = list(decode_steps(model, prompt, 20, temperature=temperature, seed=0))
    tokens = [t for t, _ in steps]
    assert len(tokens) == 20
    for i, (token, logits) in enumerate(steps):
        full = recompute(model, prompt, tokens[:i], cache=True)
        assert temperature or int(full.argmax()) == token
        assert (full - logits).abs().max().item() < 1e-4
        if "switch" not in family:  # without Switch layers a full pass has no capacity to differ by
            assert (recompute(model, prompt, tokens[:i], cache=False) - logits).abs().max().item() < 1e-4


@torch.no_grad()
def test_switch_decoding_drops_no_token_where_a_full_pass_does():
    model = tiny_model(FAMILIES["switch"])
    ids = torch.randint(0, 63, (1, 16), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    assert all(s.dropped_frac.item() > 0 for s in full.moe)
    decoded = model(ids, cache=model.new_cache())
    assert all(s.dropped_frac.item() == 0 for s in decoded.moe)
    roomy = tiny_model(dict(FAMILIES["switch"], moe=dict(num_experts=4, eval_capacity_factor=4.0, every=1)))
    torch.testing.assert_close(roomy(ids).logits, roomy(ids, cache=roomy.new_cache()).logits)


@torch.no_grad()
def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_model(FAMILIES["alternating"])
    prompt = [1, 2, 3]
    draw = dict(temperature=1.5, top_k=20)
    assert generate(model, prompt, 20, seed=3, **draw) == generate(model, prompt, 20, seed=3, **draw)
    assert generate(model, prompt, 20, seed=3, **draw) != generate(model, prompt, 20, seed=4, **draw)
    assert generate(model, prompt, 20, temperature=1.0, top_k=1, seed=5) == generate(model, prompt, 20)


@torch.no_grad()
def test_decoding_stops_at_the_stop_token():
    model = tiny_model(FAMILIES["dense"])
    tokens = generate(model, [1, 2, 3], 20)
    assert generate(model, [1, 2, 3], 20, stop_id=tokens[4]) == tokens[:tokens.index(tokens[4]) + 1]


def test_codec_reads_and_writes_the_special_names(encoding):
    encdec = Codec(encoding, 50358)
    ids = encdec.encode("The <extra_id_0> sat<pad>.<|endoftext|>")
    assert ids == [464, 220, PAD + 1, 3332, PAD, 13, EOT]
    assert encdec.decode(ids) == "The <extra_id_0> sat<pad>.<|endoftext|>"
    assert Codec(encoding, 50257).encode("<pad>") == encoding.encode_ordinary("<pad>")  # no such id in GPT-2's


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, recorded_shard_dir):
    run = make_run(tmp_path_factory.mktemp("sample") / "run", recorded_shard_dir, train={"max_steps": 2})
    assert train_in_process(run) == 0
    return run


@pytest.mark.slow
def test_pretrain_sample_prints_the_generated_text(gpt_run, capsys):
    assert main(["sample", str(gpt_run), "--prompt", "Emma was", "--max-new-tokens", "12", "--temperature", "0.8",
                 "--top-k", "40", "--seed", "7"]) == 0
    out, err = capsys.readouterr()
    expected = sample_checkpoint(gpt_run, "Emma was", 12, temperature=0.8, top_k=40, seed=7)
    assert len(expected.ids) == 12 or expected.ids[-1] == EOT
    assert out == expected.text + "\n"
    assert "tokens/s" in err


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "300"], "exceeds the position table model.n_ctx=256"),
    (["--temperature", "-1"], "a temperature >= 0"),
])
def test_pretrain_sample_refuses_bad_requests(gpt_run, capsys, args, message):
    assert main(["sample", str(gpt_run), "--prompt", "Emma was", *args]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(TrainError, match="exceeds the position table"):
        sample_checkpoint(gpt_run, "word " * 250, 10)
