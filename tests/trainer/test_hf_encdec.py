"""The encoder-decoder family against its reference implementations in `transformers`: our model holding
the weights of a randomly initialised T5 (v1.0, v1.1), MarianMTModel (Vaswani's options) or
SwitchTransformers model gives the same logits (fp32, eval mode), Switch's routing, capacity and
dropping agree token for token, and our weights written back load into the HF model strictly."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trainer.config import ModelConfig  # noqa: E402
from trainer.model import EncoderDecoder, SwitchFFN  # noqa: E402
from trainer.model import hf_encdec  # noqa: E402

VOCAB = 101
T5 = dict(arch="encoder_decoder", n_layer=2, n_encoder_layer=3, n_head=4, d_model=32, d_kv=12, d_ff=64,
          vocab_size=VOCAB, n_ctx=64, pos_embedding="relative", norm="rmsnorm", bias=False,
          attention_scaling=False, layer_norm_eps=1e-6, relative_buckets=8, relative_max_distance=24)
SHAPES = {
    "t5-v1.0": dict(T5, activation="relu", scale_decoder_output=True),
    "t5-v1.1": dict(T5, activation="gated-gelu", tie_embeddings=False),
    "vaswani": dict(arch="encoder_decoder", n_layer=2, n_encoder_layer=3, n_head=4, d_model=32, d_ff=64,
                    vocab_size=VOCAB, n_ctx=64, pos_embedding="sinusoidal", sinusoidal_layout="concatenated",
                    norm_position="post", activation="relu", scale_embeddings=True),
    # Every other block of both stacks is a Switch layer; 3 slots per expert and sequence of 40 tokens drop many.
    "switch": dict(T5, n_layer=4, n_encoder_layer=4, activation="relu", scale_decoder_output=True,
                   moe=dict(num_experts=4, routing_group="sequence", expert_capacity=3, jitter=0.01)),
}
HF_CLASS = {"t5": "T5ForConditionalGeneration", "marian": "MarianMTModel",
            "switch_transformers": "SwitchTransformersForConditionalGeneration"}


def hf_model(cfg: ModelConfig):
    torch.manual_seed(0)
    hf = getattr(transformers, HF_CLASS[hf_encdec.family(cfg)])(hf_encdec.hf_config(cfg)).eval()
    if not cfg.tie_embeddings:  # transformers 5 ties T5's head at construction; a v1.1 checkpoint unties it
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight))
    return hf


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, VOCAB, (3, 30), generator=g)
    targets[0, -4:] = -1  # positions without a target: shifted in as the start token (HF: -100 as the pad)
    return torch.randint(0, VOCAB, (3, 40), generator=g), targets


def hf_logits(hf, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=inputs, labels=targets.masked_fill(targets < 0, -100)).logits


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_equal_the_reference_model(shape):
    cfg = ModelConfig(**SHAPES[shape])
    hf = hf_model(cfg)
    ours = EncoderDecoder(cfg).eval()
    hf_encdec.load_hf_state_dict(ours, hf.state_dict())
    inputs, targets = batch()
    with torch.no_grad():
        out = ours(inputs, targets)
    expected = hf_logits(hf, inputs, targets)
    assert expected.abs().max() > 0.1  # not a degenerate comparison
    assert (out.logits - expected).abs().max() < 1e-4
    ce = torch.nn.functional.cross_entropy(expected.flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert out.ce_loss.item() == pytest.approx(ce.item(), abs=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_our_weights_load_into_the_reference_model(shape):
    """ours -> HF (what `pretrain export hf` writes): a strict load, and the same logits."""
    cfg = ModelConfig(**SHAPES[shape])
    torch.manual_seed(2)
    ours = EncoderDecoder(cfg).eval()
    hf = hf_model(cfg)
    hf.load_state_dict(hf_encdec.to_hf_state_dict(ours), strict=True)
    inputs, targets = batch(3)
    with torch.no_grad():
        assert (ours(inputs, targets).logits - hf_logits(hf, inputs, targets)).abs().max() < 1e-4


def record(modules, hook):
    handles = [m.register_forward_hook(hook) for m in modules]
    return lambda: [h.remove() for h in handles]


def test_switch_routes_and_drops_the_same_tokens():
    """Per Switch layer and token: the chosen expert, and whether the token kept its place or was dropped."""
    cfg = ModelConfig(**SHAPES["switch"])
    hf = hf_model(cfg)
    ours = EncoderDecoder(cfg).eval()
    hf_encdec.load_hf_state_dict(ours, hf.state_dict())
    theirs, mine = [], []
    routers = [m for m in hf.modules() if type(m).__name__ == "SwitchTransformersTop1Router"]
    remove_hf = record(routers, lambda m, args, out: theirs.append((out[2].argmax(-1).flatten(),
                                                                       out[0].any(-1).flatten())))
    remove_ours = record([m for m in ours.modules() if isinstance(m, SwitchFFN)],
                         lambda m, args, out: mine.append(m.route(args[0])))
    inputs, targets = batch()
    hf_logits(hf, inputs, targets)
    with torch.no_grad():
        ours(inputs, targets)
    remove_hf(), remove_ours()
    assert len(mine) == len(theirs) == 4  # blocks 1 and 3 of each stack
    for r, (expert, kept) in zip(mine, theirs):
        assert r.capacity == 3 and r.group_counts.shape == (3, 4)  # one group per sequence
        assert torch.equal(r.expert, expert)
        assert torch.equal(r.slot < 4 * r.slots_per_expert, kept)
        assert 0 < kept.sum() < kept.numel()  # tokens really dropped, and some kept
        assert kept.sum() == r.group_counts.clamp(max=3).sum()


@pytest.mark.parametrize("change,problem", [
    (dict(moe=dict(num_experts=4)), "fixed expert_capacity per sequence"),
    (dict(moe=dict(num_experts=4, every=3, routing_group="sequence", expert_capacity=4)), "model.moe.every"),
    (dict(norm="layernorm"), "model.norm"),
    (dict(attention_scaling=True), "model.attention_scaling"),
    (dict(scale_decoder_output=False), "model.scale_decoder_output"),
    (dict(pos_embedding="sinusoidal"), "model.sinusoidal_layout"),
], ids=["batch-capacity", "every-3", "layernorm", "scaled-attention", "unscaled-tied-switch", "interleaved"])
def test_configs_hf_cannot_express_are_refused(change, problem):
    base = dict(SHAPES["switch"]) if "scale_decoder_output" in change else dict(T5, activation="relu")
    cfg = ModelConfig(**(base | change))
    with pytest.raises(ValueError, match=problem):
        hf_encdec.hf_config(cfg)


def test_an_untied_checkpoint_is_refused_by_a_tied_model():
    untied = ModelConfig(**SHAPES["t5-v1.1"])
    tied = ModelConfig(**(SHAPES["t5-v1.1"] | dict(tie_embeddings=True)))
    with pytest.raises(ValueError, match="lm_head.weight differs from shared.weight"):
        hf_encdec.load_hf_state_dict(EncoderDecoder(tied), hf_model(untied).state_dict())
