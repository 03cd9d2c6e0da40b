"""bench/switch_vs_dense.py's pair contract: the shipped pairs differ only in `moe` and draw the same tokens,
and a mismatched pair is refused with the field named."""
from __future__ import annotations

import pytest

from bench.switch_vs_dense import REPO, load_pair, main, parse_args
from trainer.errors import ConfigError
from trainer.model.counting import flops_per_token

TRAIN = REPO / "configs" / "train"


@pytest.mark.parametrize("dense,switch", [("tiny-gpt-cpu", "tiny-switch-cpu"), ("tiny-t5-cpu", "tiny-switch-t5-cpu")])
def test_shipped_pairs_are_dense_plus_eight_experts_at_equal_flops(dense, switch):
    d, s = load_pair(parse_args(["--dense", str(TRAIN / f"{dense}.yaml"), "--switch", str(TRAIN / f"{switch}.yaml")]))
    assert s.model.moe.num_experts == 8 and s.model.moe.capacity_factor == 1.25
    # Only the routers' d_model x 8 matmuls differ.
    assert flops_per_token(s.model, train=s.train) / flops_per_token(d.model, train=d.train) == pytest.approx(1, abs=1e-3)


def test_a_pair_with_different_objectives_is_refused(capsys):
    args = ["--dense", str(TRAIN / "tiny-t5-cpu.yaml"), "--switch", str(TRAIN / "tiny-switch-cpu.yaml")]
    with pytest.raises(ConfigError, match="train.objective"):
        load_pair(parse_args(args))
    assert main(args) == 2 and "error: train.objective" in capsys.readouterr().err
