"""The encoder-decoder model: shifting targets, what each stack may see, the loss, its init rules,
activation checkpointing, config refusals, and building and training through the engine (ZeRO-3
partitioned at creation; Switch on the meta device) with the same initial weights as one device."""
from __future__ import annotations

import os

import pytest
import torch

from trainer.config import ModelConfig, RunConfig
from trainer.model import EncoderDecoder, model_for

T5 = dict(arch="encoder_decoder", n_layer=2, n_encoder_layer=2, n_head=2, d_model=32, d_kv=8, d_ff=48,
          vocab_size=64, n_ctx=32, pos_embedding="relative", norm="rmsnorm", bias=False, attention_scaling=False,
          activation="relu", scale_decoder_output=True, init="t5", decoder_start_token_id=63)
VASWANI = dict(arch="encoder_decoder", n_layer=2, n_head=2, d_model=32, d_ff=48, vocab_size=64, n_ctx=32,
               pos_embedding="sinusoidal", norm_position="post", activation="relu", scale_embeddings=True)
GPT = dict(arch="decoder", n_layer=1, n_head=2, d_model=16, vocab_size=64, n_ctx=8)
SWITCH = dict(T5, moe=dict(num_experts=4, routing_group="sequence", jitter=0.1))


def ids(*shape, seed=0):
    return torch.randint(0, 63, shape, generator=torch.Generator().manual_seed(seed))


def test_targets_are_shifted_right_behind_the_start_token():
    model = EncoderDecoder(ModelConfig(**T5))
    targets = torch.tensor([[5, 6, 7, -1], [8, 9, -1, -1]])
    assert model.shift_right(targets).tolist() == [[63, 5, 6, 7], [63, 8, 9, 63]]
    inputs = ids(2, 6)
    with torch.no_grad():
        given = model(inputs, decoder_inputs=model.shift_right(targets)).logits
        assert torch.equal(model(inputs, targets).logits, given)
    with pytest.raises(ValueError, match="needs targets"):
        model(inputs)


@pytest.mark.parametrize("shape", [T5, VASWANI, SWITCH], ids=["t5", "vaswani", "switch"])
def test_decoder_is_causal_and_encoder_sees_every_input(shape):
    # Switch routes per sequence and capacity 2.0 x 8 / 4 holds every token: changing one token moves no other.
    cfg = ModelConfig(**(shape | ({"moe": dict(SWITCH["moe"], eval_capacity_factor=4.0)} if "moe" in shape else {})))
    model = EncoderDecoder(cfg).eval()
    inputs, targets = ids(2, 8), ids(2, 8, seed=1)
    changed_target, changed_input = targets.clone(), inputs.clone()
    changed_target[:, 5] = (targets[:, 5] + 1) % 63
    changed_input[:, -1] = (inputs[:, -1] + 1) % 63
    with torch.no_grad():
        base = model(inputs, targets).logits
        later = model(inputs, changed_target).logits
        other_input = model(changed_input, targets).logits
    assert torch.equal(base[:, :6], later[:, :6])  # decoder position 5 reads target 4 at most
    assert not torch.allclose(base[:, 6], later[:, 6])
    assert not torch.allclose(base[:, 0], other_input[:, 0])  # the first output sees the last input


def test_switch_loss_adds_the_scaled_router_losses_of_both_stacks():
    cfg = ModelConfig(**SWITCH)
    torch.manual_seed(0)
    out = EncoderDecoder(cfg)(ids(2, 8), ids(2, 6, seed=1))
    assert [s.layer for s in out.moe] == [1, 3]  # encoder block 1, decoder block 1 (numbered after the encoder)
    aux = torch.stack([s.aux_loss for s in out.moe]).mean()
    z = torch.stack([s.z_loss for s in out.moe]).mean()
    assert out.aux_loss.item() == pytest.approx(aux.item()) and out.z_loss.item() == pytest.approx(z.item())
    assert out.loss.item() == pytest.approx((out.ce_loss + 0.01 * aux + 1e-3 * z).item())


def test_init_rules_follow_the_chosen_scheme():
    t5 = EncoderDecoder(ModelConfig(**SWITCH))
    d, d_kv, d_ff = 32, 8, 48
    assert t5.init_rule("wte.weight") == pytest.approx((0.0, 1.0))
    assert t5.init_rule("encoder.h.0.attn.q_attn.weight") == pytest.approx((0.0, (d * d_kv) ** -0.5))
    assert t5.init_rule("decoder.h.0.cross_attn.c_attn.weight") == pytest.approx((0.0, d ** -0.5))
    assert t5.init_rule("encoder.h.0.attn.c_proj.weight") == pytest.approx((0.0, (2 * d_kv) ** -0.5))
    assert t5.init_rule("encoder.h.0.mlp.c_proj.weight") == pytest.approx((0.0, d_ff ** -0.5))
    assert t5.init_rule("decoder.relative_bias.table.weight") == pytest.approx((0.0, d ** -0.5))
    assert t5.init_rule("decoder.h.1.mlp.experts.w_fc") == pytest.approx((0.0, 0.1 * d ** -0.5))  # x expert_init_scale
    assert t5.init_rule("decoder.ln_f.weight") == pytest.approx((1.0, 0.0))
    gpt2 = EncoderDecoder(ModelConfig(**VASWANI))
    assert gpt2.init_rule("wte.weight") == pytest.approx((0.0, 0.02))
    assert gpt2.init_rule("decoder.h.1.mlp.c_proj.weight") == pytest.approx((0.0, 0.02 / 2))  # 1/sqrt(2 n_layer)
    assert gpt2.init_rule("encoder.h.0.ln_2.bias") == pytest.approx((0.0, 0.0))


def test_activation_checkpointing_gives_identical_gradients():
    from trainer.engine import apply_activation_checkpointing

    def gradients(checkpointing: bool):
        torch.manual_seed(0)
        model = EncoderDecoder(ModelConfig(**SWITCH))
        if checkpointing:
            apply_activation_checkpointing(model)
        torch.manual_seed(1)  # router jitter: the recomputation replays the same noise
        out = model(ids(4, 8), ids(4, 6, seed=1))
        out.loss.backward()
        return out.loss.item(), {n: p.grad for n, p in model.named_parameters()}

    (loss, grads), (loss_ckpt, grads_ckpt) = gradients(False), gradients(True)
    assert loss == loss_ckpt and all(torch.equal(grads[n], grads_ckpt[n]) for n in grads)


@pytest.mark.parametrize("change,message", [
    (dict(GPT, norm="rmsnorm"), "model.norm: 'rmsnorm' needs model.arch: encoder_decoder"),
    (dict(GPT, pos_embedding="relative"), "model.pos_embedding: 'relative' needs"),
    (dict(pos_embedding="learned"), "model.pos_embedding: 'learned' is not supported"),
    (dict(decoder_start_token_id=64), "model.decoder_start_token_id: 64 is not below"),
    (dict(tie_embeddings=False), "model.scale_decoder_output: needs model.tie_embeddings"),
    (dict(activation="gated-gelu", moe=dict(num_experts=4)), "gated-gelu experts"),
])
def test_impossible_configs_are_refused_naming_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**(change if change.get("arch") == "decoder" else T5 | change))


def test_decoder_configs_build_gpt_unchanged():
    gpt = model_for(ModelConfig(**GPT))
    assert type(gpt).__name__ == "GPT" and len(gpt.blocks()) == 1


@pytest.fixture
def one_process_world():
    from trainer.distributed import init_distributed, shutdown_distributed

    saved = dict(os.environ)
    init_distributed()
    yield
    shutdown_distributed()
    os.environ.clear()
    os.environ.update(saved)


def run_config(model: dict, zero: int) -> RunConfig:
    model = dict(model, vocab_size=50358, decoder_start_token_id=50257)  # room for span corruption's ids
    cfg = RunConfig(model=model, data={"path": "unused"}, parallel={"zero_stage": zero},
                    train={"seq_len": 16, "micro_batch_size": 2, "global_batch_size": 2, "precision": "fp32",
                           "lr": 3e-3, "warmup_tokens": 0, "activation_checkpointing": True,
                           "objective": "span_corruption"})
    return cfg.for_world(1)


def flat_weights(model) -> dict[str, torch.Tensor]:
    return {n: (p.ds_tensor[:p.ds_numel] if hasattr(p, "ds_tensor") else p.detach().flatten()).clone()
            for n, p in model.named_parameters()}


def build_and_train(model: dict, zero: int) -> None:
    from trainer.engine import build_engine, build_model

    reference = flat_weights(build_model(run_config(model, 0), world=1, accum=1))
    cfg = run_config(model, zero)
    built = build_model(cfg, world=1, accum=1)
    assert isinstance(built, EncoderDecoder)
    assert all(torch.equal(w, reference[n]) for n, w in flat_weights(built).items())
    engine = build_engine(cfg, built, world=1, accum=1)
    inputs, targets = ids(2, 16), ids(2, 12, seed=1)
    losses = []
    for _ in range(6):
        out = engine(inputs, targets)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert len(out.moe) == (2 if "moe" in model else 0)


@pytest.mark.slow
def test_engine_builds_and_trains_it(one_process_world):
    """The engine's factory picks EncoderDecoder; its weights equal a ZeRO-0 build's (layout-invariant init,
    meta or partitioned construction); six steps with activation checkpointing on one batch bring the loss
    down. ZeRO-3 first: a later build in this process must not meet zero.Init's leftover hooks."""
    build_and_train(T5, zero=3)  # partitioned as created
    build_and_train(SWITCH, zero=1)  # experts marked and built on the meta device (ZeRO-3 refuses MoE)


# tiny-switch-t5.yaml (Switch layers in block 1 of each stack) with 4 experts routed per sequence.
TINY_SWITCH_T5 = dict(moe=dict(num_experts=4, routing_group="sequence", jitter=0.01))


@pytest.mark.slow
@pytest.mark.multiproc
def test_switch_encoder_decoder_trains_the_same_with_expert_parallelism(tmp_path, shard_dir):
    """The training loop, unchanged: 1 process at ZeRO-0 and 2 at ZeRO-2 with the experts split over
    both start from the same weights and log the same losses and expert loads; checkpoints hold every expert."""
    from tests.trainer.conftest import free_port, make_run, read_metrics, run_training
    from trainer import testing_hooks
    from trainer.weight_shards import ShardedWeights

    def train(nproc: int, zero: int, ep: int):
        run = make_run(tmp_path / f"run-{nproc}", shard_dir, model="tiny-switch-t5", model_overrides=TINY_SWITCH_T5,
                       train={"max_steps": 6, "micro_batch_size": 4, "global_batch_size": 8,
                              "objective": "span_corruption"},
                       parallel={"zero_stage": zero, "ep_size": ep}, checkpoint={"interval": 6})
        os.environ[testing_hooks.SAVE_AT_START] = "1"
        try:
            run_training(run, nproc=nproc, port=free_port())
        finally:
            del os.environ[testing_hooks.SAVE_AT_START]
        return dict(ShardedWeights(run / "checkpoints" / "step-0").tensors()), read_metrics(run)

    weights, metrics = train(1, 0, 1)
    sharded_weights, sharded_metrics = train(2, 2, 2)
    assert sharded_weights.keys() == weights.keys() and any(".experts.w_fc" in k for k in weights)
    assert all(torch.equal(sharded_weights[k], weights[k]) for k in weights)
    for step in range(1, 7):
        assert sharded_metrics[step]["loss"] == pytest.approx(metrics[step]["loss"], rel=1e-5)
        assert sharded_metrics[step]["expert_load"] == metrics[step]["expert_load"]
    assert len(metrics[6]["expert_load"]) == 2 and metrics[6]["loss"] < metrics[1]["loss"]


@pytest.mark.slow
def test_switch_encoder_decoder_resumes_exactly(tmp_path, shard_dir):
    """8 steps straight == 4 steps, then resumed from the step-4 checkpoint to 8: the same losses, bit for bit."""
    import yaml

    from tests.trainer.conftest import make_run, read_metrics, train_in_process

    def run(name: str, steps: int):
        return make_run(tmp_path / name, shard_dir, model="tiny-switch-t5", model_overrides=TINY_SWITCH_T5,
                        train={"max_steps": steps, "seq_len": 32, "objective": "span_corruption"},
                        parallel={"zero_stage": 1},
                        checkpoint={"interval": 4})

    straight, stopped = run("straight", 8), run("stopped", 4)
    assert train_in_process(straight) == 0 and train_in_process(stopped) == 0
    cfg = yaml.safe_load((stopped / "config.yaml").read_text())
    cfg["train"]["max_steps"] = 8
    (stopped / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert train_in_process(stopped) == 0
    expected, resumed = read_metrics(straight), read_metrics(stopped)
    assert [resumed[s]["loss"] for s in range(1, 9)] == [expected[s]["loss"] for s in range(1, 9)]


@pytest.mark.slow
def test_pretrain_eval_of_a_span_corruption_run(tmp_path, shard_dir, shared_data):
    """`pretrain eval` on a tiny T5 checkpoint: span-corruption loss and perplexity over held-out documents,
    counted over the targets (14 per sequence of 64 inputs), the same at every call."""
    import math

    from tests.trainer.conftest import make_run, train_in_process
    from trainer.eval import evaluate

    run = make_run(tmp_path / "run", shard_dir, model="tiny-t5", checkpoint={"interval": 3},
                   train={"max_steps": 3, "seq_len": 64, "objective": "span_corruption"})
    assert train_in_process(run) == 0
    tokenizer = str(shared_data / "tokenizer" / "gpt2" / "r50k_base.tiktoken")
    result = evaluate(run, tokenizer, max_batches=2)
    assert result["heldout_tokens"] == 2 * 4 * 14
    assert not result.get("few_shot")  # the few-shot tasks are for causal LMs
    assert math.isclose(result["heldout_perplexity"], math.exp(result["heldout_loss"]))
    assert 5.0 < result["heldout_loss"] < math.log(50358) + 1
    assert evaluate(run, tokenizer, max_batches=2)["heldout_loss"] == result["heldout_loss"]
