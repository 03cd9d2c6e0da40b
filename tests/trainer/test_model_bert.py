"""BERT against `transformers`' BertForPreTraining: our model holding a randomly initialised reference's
weights gives the same MLM and NSP logits and loss (fp32, eval mode), and ours written back load strictly;
what attention sees (both directions, never padding); parameter counts (the reference's own, the paper's
110M and 340M); init rules; activation checkpointing; building through the engine (ZeRO-3 partitioned at
creation) with the same weights as one device; and training with the real loop, resumed exactly and over
two processes at ZeRO-2."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.trainer.test_model_encdec import flat_weights, one_process_world  # noqa: F401  (a fixture)
from trainer.config import ModelConfig, RunConfig
from trainer.model import BERT, hf_bert, model_for
from trainer.model.counting import param_counts

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
VOCAB = 101
SHAPE = dict(arch="encoder", n_layer=2, n_head=4, d_model=32, d_ff=64, vocab_size=VOCAB, n_ctx=40, type_vocab_size=3,
             norm_position="post", activation="gelu-exact", init="bert", layer_norm_eps=1e-12)


def batch(seed: int = 1) -> tuple[torch.Tensor, ...]:
    """ids, token types, attention mask (two rows padded), NSP labels, MLM targets (-1: not predicted)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 30), generator=g)
    types = torch.randint(0, 3, (3, 30), generator=g)
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[0, 20:], mask[1, 26:] = False, False
    targets = torch.where(torch.rand(3, 30, generator=g) < 0.3, torch.randint(0, VOCAB, (3, 30), generator=g), -1)
    return ids, types, mask, torch.tensor([0, 1, 1]), targets.masked_fill(~mask, -1)


def hf_model(cfg: ModelConfig):
    """A randomly initialised BertForPreTraining, its norms and biases drawn too (HF starts them at 1 and 0)."""
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(hf_bert.hf_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("activation", ["gelu-exact", "gelu"])
def test_logits_and_loss_equal_bert_for_pretraining(activation):
    cfg = ModelConfig(**SHAPE | dict(activation=activation))
    hf = hf_model(cfg)
    ours = BERT(cfg).eval()
    hf_bert.load_hf_state_dict(ours, hf.state_dict())
    ids, types, mask, nsp, targets = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask.long(), next_sentence_label=nsp,
                 labels=targets.masked_fill(targets < 0, -100))
        full = ours(ids, types, mask)
        trained = ours(ids, types, mask, nsp, targets)
    real = mask.unsqueeze(-1)  # padded positions' outputs are never used; both models compute them alike anyway
    assert (ref.prediction_logits - full.logits).mul(real).abs().max() < 1e-4
    assert (ref.seq_relationship_logits - full.nsp_logits).abs().max() < 1e-4
    assert torch.equal(trained.logits, full.logits[targets != -1])  # the head runs at predicted positions only
    assert abs(trained.loss.item() - ref.loss.item()) < 1e-5
    assert trained.loss.item() == pytest.approx((trained.ce_loss + trained.nsp_loss).item())
    back = transformers.BertForPreTraining(hf_bert.hf_config(cfg)).eval()
    back.load_state_dict(hf_bert.to_hf_state_dict(ours), strict=True)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, token_type_ids=types, attention_mask=mask.long()).prediction_logits,
                           ref.prediction_logits)


def test_hf_mapping_refuses_what_bert_cannot_express():
    with pytest.raises(ValueError, match=r"cannot map to Hugging Face BERT: model.norm is 'rmsnorm' .*; model.bias is "
                                         r"False .*; model.d_kv is 4"):
        hf_bert.hf_config(ModelConfig(**SHAPE | dict(norm="rmsnorm", bias=False, d_kv=4)))
    cfg = ModelConfig(**SHAPE)
    sd = hf_bert.to_hf_state_dict(BERT(cfg))
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.decoder.bias"] + 1
    with pytest.raises(ValueError, match="cls.predictions.decoder.bias differs from cls.predictions.bias"):
        hf_bert.load_hf_state_dict(BERT(cfg), sd)


def test_attention_sees_both_directions_and_never_padding():
    model = BERT(ModelConfig(**SHAPE)).eval()
    ids, types, mask, _, _ = batch()
    changed_last, changed_padding = ids.clone(), ids.clone()
    changed_last[:, 19] = (ids[:, 19] + 1) % VOCAB
    changed_padding[0, 20:] = (ids[0, 20:] + 1) % VOCAB
    with torch.no_grad():
        base = model(ids, types, mask)
        assert not torch.allclose(base.logits[:, 0], model(changed_last, types, mask).logits[:, 0])
        other = model(changed_padding, types, mask)
        short = model(ids[:1, :20], types[:1, :20])
    assert torch.equal(base.logits[0, :20], other.logits[0, :20]) and torch.equal(base.nsp_logits, other.nsp_logits)
    assert torch.allclose(base.logits[0, :20], short.logits[0], atol=1e-5)  # padding is as good as absent


def test_counts_equal_the_model_and_bert_for_pretraining():
    for change in ({}, dict(bias=False), dict(norm="rmsnorm"), dict(d_kv=4)):
        cfg = ModelConfig(**SHAPE | change)
        model, counts = BERT(cfg), param_counts(cfg)
        assert counts.total == model.num_params() and counts.non_embedding == model.num_params(non_embedding=True)
    cfg = ModelConfig(**SHAPE)
    assert param_counts(cfg).total == sum(p.numel() for p in hf_model(cfg).parameters())


@pytest.mark.parametrize("name,paper", [("bert-base", 110e6), ("bert-large", 340e6)])
def test_shipped_configs_are_the_papers_sizes(name, paper):
    """Within 2% of Devlin et al.'s count at their 30,522-id WordPiece vocabulary, and equal to
    BertForPreTraining's own count at ours (built on the meta device: no memory)."""
    shipped = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert param_counts(ModelConfig(**shipped | dict(vocab_size=30522))).total == pytest.approx(paper, rel=0.02)
    cfg = ModelConfig(**shipped)
    with torch.device("meta"):
        reference = transformers.BertForPreTraining(hf_bert.hf_config(cfg))
    assert param_counts(cfg).total == sum(p.numel() for p in reference.parameters())


def test_init_rules_are_berts():
    bert = BERT(ModelConfig(**SHAPE))
    assert bert.init_rule("transformer.wtt.weight") == (0.0, 0.02)
    assert bert.init_rule("transformer.h.1.mlp.c_proj.weight") == (0.0, 0.02)  # no residual scaling
    assert bert.init_rule("nsp_head.bias") == (0.0, 0.0) and bert.init_rule("mlm.ln.weight") == (1.0, 0.0)
    gpt2 = BERT(ModelConfig(**SHAPE | dict(init="gpt2")))
    assert gpt2.init_rule("transformer.h.1.mlp.c_proj.weight") == pytest.approx((0.0, 0.01))  # 0.02 / sqrt(2 n_layer)
    assert type(model_for(ModelConfig(**SHAPE))) is BERT and len(bert.blocks()) == 2


def test_activation_checkpointing_gives_identical_gradients():
    from trainer.engine import apply_activation_checkpointing

    def gradients(checkpointing: bool):
        torch.manual_seed(0)
        model = BERT(ModelConfig(**SHAPE | dict(dropout=0.1)))
        if checkpointing:
            apply_activation_checkpointing(model)
        torch.manual_seed(1)  # dropout: the recomputation replays the same masks
        out = model(*batch())
        out.loss.backward()
        return out.loss.item(), {n: p.grad for n, p in model.named_parameters()}

    (loss, grads), (loss_ckpt, grads_ckpt) = gradients(False), gradients(True)
    assert loss == loss_ckpt and all(torch.equal(grads[n], grads_ckpt[n]) for n in grads)


def run_config(zero: int) -> RunConfig:
    cfg = RunConfig(model=SHAPE | dict(vocab_size=50361, n_ctx=32), data={"path": "unused"},
                    parallel={"zero_stage": zero},
                    train={"objective": "mlm_nsp", "seq_len": 30, "micro_batch_size": 3, "global_batch_size": 3,
                           "precision": "fp32", "lr": 3e-3, "warmup_tokens": 0, "activation_checkpointing": True})
    return cfg.for_world(1)


@pytest.mark.slow
def test_engine_builds_and_trains_it(one_process_world):
    """ZeRO-3 partitions BERT as it is created, with a ZeRO-0 build's weights; six steps on one batch bring
    the loss down."""
    from trainer.engine import build_engine, build_model

    reference = flat_weights(build_model(run_config(0), world=1, accum=1))
    cfg = run_config(3)
    model = build_model(cfg, world=1, accum=1)
    assert isinstance(model, BERT) and all(hasattr(p, "ds_tensor") for p in model.parameters())
    assert all(torch.equal(w, reference[n]) for n, w in flat_weights(model).items())
    engine = build_engine(cfg, model, world=1, accum=1)
    losses = []
    for _ in range(6):
        out = engine(*batch())
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def tiny_bert_run(run_dir: Path, data_dir: Path, steps: int, **sections) -> Path:
    from tests.trainer.conftest import make_run

    return make_run(run_dir, data_dir, model="tiny-bert",
                    train={"objective": "mlm_nsp", "max_steps": steps, "micro_batch_size": 4, "global_batch_size": 8},
                    checkpoint={"interval": 3}, **sections)


@pytest.mark.slow
def test_tiny_bert_trains_and_evaluates(tmp_path, shard_dir):
    """configs/model/tiny-bert.yaml through the training loop: the loss falls, the logged tokens are the raw
    tokens taken, and `pretrain eval` reports the held-out MLM loss."""
    from tests.trainer.conftest import read_metrics, train_in_process
    from trainer.eval import evaluate

    run = tiny_bert_run(tmp_path / "run", shard_dir, steps=12)
    assert train_in_process(run) == 0
    metrics = read_metrics(run)
    assert metrics[12]["loss"] < metrics[1]["loss"] - 1.0 and metrics[12]["tokens"] == 12 * 8 * 61
    assert metrics[1]["loss"] - metrics[1]["ce_loss"] == pytest.approx(0.69, abs=0.1)  # NSP starts at ln 2
    result = evaluate(run, max_batches=2)
    assert result["objective"] == "mlm_nsp" and result["heldout_loss"] < metrics[1]["ce_loss"]
    assert "few_shot" not in result


@pytest.mark.slow
@pytest.mark.multiproc
def test_tiny_bert_trains_the_same_over_two_processes_and_resumes_exactly(tmp_path, shard_dir):
    """6 steps in one process at ZeRO-0 == 3 steps over two processes at ZeRO-2, then resumed to 6 there."""
    from tests.trainer.conftest import free_port, read_metrics, run_training, train_in_process

    straight = tiny_bert_run(tmp_path / "straight", shard_dir, steps=6)
    assert train_in_process(straight) == 0
    sharded = tiny_bert_run(tmp_path / "sharded", shard_dir, steps=3, parallel={"zero_stage": 2})
    run_training(sharded, nproc=2, port=free_port())
    cfg = yaml.safe_load((sharded / "config.yaml").read_text())
    cfg["train"]["max_steps"] = 6
    (sharded / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_training(sharded, nproc=2, port=free_port())
    assert "resumed from" in (sharded / "logs" / "rank-0.log").read_text()
    expected, got = read_metrics(straight), read_metrics(sharded)
    for step in range(1, 7):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
        assert got[step]["tokens_by_source"] == expected[step]["tokens_by_source"]
    assert os.path.isdir(sharded / "checkpoints" / "step-6")
