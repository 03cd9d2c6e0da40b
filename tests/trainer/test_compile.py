"""train.compile: regional torch.compile trains the same model as eager (fp32 to rounding), resumes
bit-exactly, leaves routing eager in Switch blocks, and is refused with ZeRO-3."""
from __future__ import annotations

import pytest
import torch
import yaml

from tests.trainer.conftest import make_run, read_metrics, train_in_process
from trainer.config import ModelConfig, MoEConfig, RunConfig
from trainer.engine import apply_compile
from trainer.model import GPT
from trainer.model.moe import SwitchFFN


def compiled_modules(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None}


def test_compile_with_zero3_is_refused_naming_the_field(shard_dir, tmp_path):
    run = make_run(tmp_path / "run", shard_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["compile"], cfg["parallel"]["zero_stage"] = True, 3
    with pytest.raises(ValueError, match=r"train\.compile: needs parallel\.zero_stage 0-2"):
        RunConfig.model_validate(cfg)


@pytest.mark.slow
def test_switch_blocks_compile_all_but_routing_and_match_eager():
    torch.manual_seed(0)
    eager = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, n_ctx=64, vocab_size=300,
                            moe=MoEConfig(num_experts=4, jitter=0.0)))
    compiled = GPT(eager.cfg)
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled)
    # Block 0 is dense (moe.every 2): compiled whole; block 1's router and experts stay eager.
    assert compiled_modules(compiled) == {"transformer.h.0", "transformer.h.1.ln_1", "transformer.h.1.attn",
                                          "transformer.h.1.ln_2"}
    assert not any(isinstance(m, SwitchFFN) for name, m in compiled.named_modules() if name in compiled_modules(compiled))
    idx = torch.randint(0, 300, (2, 64))
    losses = []
    for model in (eager, compiled):
        out = model(idx, idx)
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and exports are unchanged


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes_exactly(shard_dir, tmp_path):
    """tiny-gpt (alternating banded attention), one process: 4 steps eager, 4 compiled, and 2 compiled +
    resume to 4."""
    def run(name, steps, compile_):
        path = tmp_path / name
        if not path.exists():
            make_run(path, shard_dir, train={"max_steps": steps, "seq_len": 32, "compile": compile_},
                     checkpoint={"interval": 2})
        else:
            cfg = yaml.safe_load((path / "config.yaml").read_text())
            cfg["train"]["max_steps"] = steps
            (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        assert train_in_process(path) == 0
        return read_metrics(path)

    eager, straight = run("eager", 4, False), run("compiled", 4, True)
    run("resumed", 2, True)
    resumed = run("resumed", 4, True)
    assert [straight[s]["loss"] for s in (1, 2, 3, 4)] == pytest.approx([eager[s]["loss"] for s in (1, 2, 3, 4)],
                                                                        rel=1e-5)
    assert [resumed[s]["loss"] for s in (3, 4)] == [straight[s]["loss"] for s in (3, 4)]
