import pytest
import torch

from trainer.errors import TrainError
from trainer.export import export_hf
from trainer.pretrained import load_pretrained


def test_exported_transformers_model_gives_our_logits(dense_run, tmp_path):
    from transformers import GPT2LMHeadModel

    out = export_hf(dense_run, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ours, _, _ = load_pretrained(dense_run)
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)


def test_models_gpt2_cannot_express_are_refused(tmp_path, shard_dir):
    from tests.trainer.conftest import make_run, train_in_process

    run = make_run(tmp_path / "run", shard_dir, train={"max_steps": 1})  # tiny-gpt: alternating attention
    train_in_process(run)
    with pytest.raises(TrainError, match="cannot map to Hugging Face GPT-2.*alternating"):
        export_hf(run, tmp_path / "hf")
