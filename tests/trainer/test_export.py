"""`pretrain export hf` for every family: each tiny config trained a few steps, exported, and loaded back
with `transformers` offline gives our logits (fp32, < 1e-4); greedy `generate` on the exported model equals
`pretrain sample` token for token; the tokenizer saved beside it encodes as tiktoken does; configs a
family cannot express are refused with the reason, and a failed check leaves no directory behind."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import trainer.export as export  # noqa: E402
from tests.trainer.conftest import make_run, train_in_process  # noqa: E402
from trainer.errors import TrainError  # noqa: E402
from trainer.export import export_hf  # noqa: E402
from trainer.pretrained import load_pretrained  # noqa: E402
from trainer.sample import sample_checkpoint  # noqa: E402
from trainer.special_tokens import EOT, PAD  # noqa: E402

T5 = dict(name="tiny-t5", arch="encoder_decoder", n_layer=2, n_head=2, d_model=64, d_kv=32, d_ff=256, n_ctx=256,
          vocab_size=50358, pos_embedding="relative", norm="rmsnorm", layer_norm_eps=1e-6, bias=False,
          attention_scaling=False, activation="relu", tie_embeddings=True, scale_decoder_output=True,
          decoder_start_token_id=PAD, init="t5", dropout=0.0, attention="dense", local_window=256)
SWITCH_MOE = dict(num_experts=4, every=2, capacity_factor=1.25, eval_capacity_factor=2.0, jitter=0.01)
# (model yaml, overrides, train overrides, the transformers class it exports to)
FAMILIES = {
    "gpt2": ("tiny-gpt", dict(attention="dense"), {}, "GPT2LMHeadModel"),
    "gpt_neo": ("tiny-gpt", {}, {}, "GPTNeoForCausalLM"),  # alternating, band 32 < seq_len 64
    "pretrain_switch": ("tiny-switch", {}, {}, "PretrainSwitchForCausalLM"),
    "t5": ("tiny-gpt", T5, dict(objective="span_corruption"), "T5ForConditionalGeneration"),
    # SwitchTransformers routes with a fixed capacity per sequence: 12 slots of 32 decoder tokens drop some.
    "switch_transformers": ("tiny-gpt", dict(T5, moe=dict(SWITCH_MOE, routing_group="sequence", expert_capacity=12)),
                            dict(objective="span_corruption"), "SwitchTransformersForConditionalGeneration"),
    # The paper's capacity per micro-batch, from the capacity factor: the library's router cannot, ours can.
    "pretrain_switch_transformers": ("tiny-gpt", dict(T5, moe=SWITCH_MOE), dict(objective="span_corruption"),
                                     "PretrainSwitchTransformersForConditionalGeneration"),
    "marian": ("tiny-gpt", dict(name="tiny-transformer", arch="encoder_decoder", n_layer=2, n_head=2, d_model=64,
                                d_ff=256, n_ctx=256, vocab_size=50358, pos_embedding="sinusoidal",
                                sinusoidal_layout="concatenated", norm_position="post", activation="relu",
                                scale_embeddings=True, decoder_start_token_id=PAD, attention="dense"),
               dict(objective="span_corruption"), "MarianMTModel"),
}
DECODER_ONLY = ("gpt2", "gpt_neo", "pretrain_switch")


def train_family(root, data_dir, name: str, **model_changes):
    yaml_name, overrides, train, _ = FAMILIES[name]
    run = make_run(root / name, data_dir, yaml_name, {**overrides, **model_changes},
                   train={"max_steps": 3, **train})
    assert train_in_process(run) == 0
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, recorded_shard_dir):
    """family -> (run dir, export dir, class written), trained and exported once for the module."""
    root = tmp_path_factory.mktemp("export")
    done = {}

    def get(name: str):
        if name not in done:
            run = train_family(root, recorded_shard_dir, name)
            done[name] = (run, *export_hf(run, root / f"{name}-hf"))
        return done[name]
    return get


def load_hf(out, name: str):
    auto = transformers.AutoModelForCausalLM if name in DECODER_ONLY else transformers.AutoModelForSeq2SeqLM
    return auto.from_pretrained(out, dtype=torch.float32, local_files_only=True, trust_remote_code=True).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_exported_model_gives_our_logits(exported, name):
    run, out, class_name = exported(name)
    assert class_name == FAMILIES[name][3]
    hf = load_hf(out, name)
    assert type(hf).__name__ == class_name
    ours, cfg, _ = load_pretrained(run)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.model.vocab_size, (3, 48), generator=g)
    with torch.no_grad():
        if name in DECODER_ONLY:
            mine, theirs = ours(ids).logits, hf(input_ids=ids, use_cache=False).logits
        else:
            targets = torch.randint(0, cfg.model.vocab_size, (3, 20), generator=g)
            mine = ours(ids, decoder_inputs=targets).logits
            theirs = hf(input_ids=ids, decoder_input_ids=targets).logits
    assert (mine - theirs).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generate_equals_pretrain_sample(exported, name):
    run, out, _ = exported(name)
    prompt = "It was a truth universally acknowledged, that"
    ours = sample_checkpoint(run, prompt, max_new_tokens=20, temperature=0.0, device="cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if name not in DECODER_ONLY:  # span corruption's inputs end with EOS
        ids = torch.cat([ids, torch.tensor([[EOT]])], dim=1)
    assert ids[0].tolist() == ours.prompt_ids
    with torch.no_grad():
        generated = load_hf(out, name).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                max_new_tokens=20, pad_token_id=EOT)
    new = generated[0, ids.shape[1]:] if name in DECODER_ONLY else generated[0, 1:]  # the decoder's start
    assert new.tolist() == ours.ids
    assert tokenizer.decode(new) == ours.text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_neo", "t5"])
def test_exported_tokenizer_encodes_as_tiktoken(exported, name, encoding, shared_data):
    _, out, _ = exported(name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = (shared_data / "books" / "austen_persuasion.txt").read_text()[:20000]
    assert tokenizer(text)["input_ids"] == encoding.encode_ordinary(text)
    assert tokenizer.eos_token_id == EOT
    if name == "t5":  # PAD and the sentinels keep their ids, and are never split
        assert tokenizer.pad_token_id == PAD
        assert tokenizer("a <extra_id_0> b<extra_id_99>")["input_ids"] == [64, 220, PAD + 1, 275, PAD + 100]


@pytest.mark.parametrize("change,reason", [
    (dict(d_kv=16), "cannot map to Hugging Face GPT-Neo: model.d_kv is 16"),
    (dict(activation="gated-gelu"), "model.activation is 'gated-gelu'"),
    (dict(T5, n_layer=3, moe=dict(SWITCH_MOE, every=3)), "model.moe.every is 3"),
    (FAMILIES["marian"][1] | dict(sinusoidal_layout="interleaved"), "model.sinusoidal_layout"),
], ids=["head-width", "gated-decoder", "switch-every-3", "interleaved-sinusoids"])
def test_configs_no_family_can_express_are_refused(change, reason):
    import yaml

    from tests.trainer.conftest import REPO
    from trainer.config import ModelConfig

    base = yaml.safe_load((REPO / "configs" / "model" / "tiny-gpt.yaml").read_text())
    with pytest.raises(ValueError, match=reason):
        export.family(ModelConfig(**(base | change)))


@pytest.mark.slow
def test_export_refuses_with_the_reason_and_writes_nothing(tmp_path, recorded_shard_dir, exported):
    run = make_run(tmp_path / "run", recorded_shard_dir, model_overrides=dict(d_kv=16), train={"max_steps": 1})
    assert train_in_process(run) == 0
    with pytest.raises(TrainError, match="cannot map to Hugging Face GPT-Neo: model.d_kv is 16"):
        export_hf(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    run, out, _ = exported("gpt2")
    with pytest.raises(TrainError, match="exists and is not an empty directory"):
        export_hf(run, out)


@pytest.mark.slow
def test_failed_check_leaves_no_directory(exported, tmp_path, monkeypatch):
    run = exported("gpt2")[0]
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference passes
    with pytest.raises(TrainError, match="export check failed: the exported model's logits differ"):
        export_hf(run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero biases and norms, so a mapping that drops or misplaces one cannot hide behind zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


SMALL = dict(n_layer=4, n_head=4, d_model=32, n_ctx=64, vocab_size=97)


@pytest.mark.parametrize("kw", [dict(attention="alternating", local_window=5), dict(bias=False, local_window=5),
                                dict(pos_embedding="sinusoidal", activation="relu", n_layer=3)])
def test_gpt_neo_holds_attention_biases_and_scaling_exactly(kw):
    from trainer.config import ModelConfig
    from trainer.model import GPT
    from trainer.model import hf_neo

    cfg = ModelConfig(**{**SMALL, "attention": "alternating", **kw})
    ours = perturbed(GPT(cfg))
    hf = transformers.GPTNeoForCausalLM(hf_neo.hf_config(cfg, 96)).eval()
    hf.load_state_dict(hf_neo.to_hf_state_dict(ours), strict=True)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() < 1e-5


def test_gpt_neo_refuses_a_query_bias_it_cannot_carry():
    from trainer.config import ModelConfig
    from trainer.model import GPT
    from trainer.model import hf_neo

    ours = perturbed(GPT(ModelConfig(**SMALL, attention="alternating")))
    with torch.no_grad():
        ours.transformer.h[2].ln_1.bias.zero_()  # sum(bias / weight) = 0: no constant direction
    with pytest.raises(ValueError, match="block 2 has a query bias"):
        hf_neo.to_hf_state_dict(ours)


@pytest.mark.parametrize("moe", [dict(eval_capacity_factor=0.5), dict(routing_group=10, eval_capacity_factor=1.0)])
def test_remote_switch_transformers_routes_and_drops_as_ours(moe):
    from trainer.config import ModelConfig
    from trainer.export.remote import remote_switch_transformers_model
    from trainer.model import EncoderDecoder

    cfg = ModelConfig(**(T5 | dict(d_model=32, d_kv=8, d_ff=48, vocab_size=97, decoder_start_token_id=96, n_layer=4,
                                   moe=dict(num_experts=4, **moe))))
    torch.manual_seed(0)
    ours = perturbed(EncoderDecoder(cfg))
    hf = remote_switch_transformers_model(ours, eos=95)
    g = torch.Generator().manual_seed(0)
    inputs, decoder = torch.randint(0, 97, (2, 40), generator=g), torch.randint(0, 97, (2, 20), generator=g)
    with torch.no_grad():
        out = ours(inputs, decoder_inputs=decoder)
        assert sum(s.dropped_frac.item() for s in out.moe) > 0  # the capacity binds
        theirs = hf(input_ids=inputs, decoder_input_ids=decoder).logits
        assert (out.logits - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("moe", [dict(eval_capacity_factor=0.5), dict(routing_group="sequence", expert_capacity=3),
                                 dict(routing_group=8, router_bias=True, every=1)])
def test_remote_switch_model_routes_and_drops_as_ours(moe):
    from trainer.config import ModelConfig
    from trainer.export.remote import remote_switch_model
    from trainer.model import GPT

    cfg = ModelConfig(**SMALL, attention="alternating", local_window=6, moe=dict(num_experts=4, **moe))
    torch.manual_seed(0)
    ours = perturbed(GPT(cfg))
    hf = remote_switch_model(ours, eos=96)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ours(ids)
        assert sum(s.dropped_frac.item() for s in out.moe) > 0  # the capacity binds
        assert (out.logits - hf(ids).logits).abs().max().item() < 1e-5


def test_every_shipped_model_config_has_an_exporter(repo_root):
    import yaml

    from trainer.config import ModelConfig

    for path in sorted((repo_root / "configs" / "model").glob("*.yaml")):
        assert export.family(ModelConfig.model_validate(yaml.safe_load(path.read_text()))) in export.EXPORTERS, path


@pytest.mark.slow
def test_pretrain_export_hf_command(exported, tmp_path, capsys):
    from cluster.cli import main

    run = exported("gpt_neo")[0]
    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 0
    assert "GPTNeoForCausalLM" in capsys.readouterr().out
    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 2  # not over an export
    assert "exists and is not an empty directory" in capsys.readouterr().err


@pytest.mark.slow
def test_bert_exports_to_bert_for_pretraining_with_our_mlm_and_nsp_logits(tmp_path, recorded_shard_dir):
    run = make_run(tmp_path / "bert", recorded_shard_dir, "tiny-bert",
                   train={"max_steps": 3, "seq_len": 64, "objective": "mlm_nsp"})
    assert train_in_process(run) == 0
    out, class_name = export_hf(run, tmp_path / "bert-hf")
    assert class_name == "BertForPreTraining"
    hf = transformers.AutoModelForPreTraining.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    ours, cfg, _ = load_pretrained(run)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.model.vocab_size, (3, 40), generator=g)
    types = (torch.arange(40) >= 17).long().expand(3, 40)
    with torch.no_grad():
        mine, theirs = ours(ids, types), hf(input_ids=ids, token_type_ids=types)
    assert (mine.logits - theirs.prediction_logits).abs().max().item() < 1e-4
    assert (mine.nsp_logits - theirs.seq_relationship_logits).abs().max().item() < 1e-4
