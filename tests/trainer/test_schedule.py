import math

from trainer.config import TrainConfig
from trainer.schedule import accumulation_at, lr_at


def cfg(**kw):
    base = dict(lr=6e-4, warmup_tokens=1000, decay_tokens=11000, seq_len=100, micro_batch_size=2,
                global_batch_size=64)
    return TrainConfig(**{**base, **kw})


def test_warmup_is_linear_in_tokens():
    t = cfg()
    assert lr_at(0, t) < lr_at(499, t) < lr_at(999, t) <= t.lr
    assert math.isclose(lr_at(499, t), t.lr / 2)


def test_cosine_decays_to_ten_percent_then_stays():
    t = cfg()
    assert math.isclose(lr_at(1000, t), t.lr)
    assert math.isclose(lr_at(6000, t), t.lr * 0.55)  # halfway: midpoint between peak and floor
    assert math.isclose(lr_at(11000, t), t.lr * 0.1)
    assert math.isclose(lr_at(10 ** 9, t), t.lr * 0.1)


def test_batch_ramp_grows_accumulation_to_full():
    # 64 sequences x 100 tokens = 6400 tokens per full batch; 2 ranks x 2 sequences per micro-batch.
    t = cfg(batch_rampup_tokens=100_000, batch_rampup_start_tokens=800)
    full = 16
    ramp = [accumulation_at(tok, t, full, dp_size=2) for tok in range(0, 120_000, 10_000)]
    assert ramp[0] == 2  # 800 tokens = 2 micro-batches of 2 x 2 x 100
    assert ramp == sorted(ramp) and ramp[-1] == full
    assert accumulation_at(50_000, t, full, 2) == 9  # (800 + 5600 / 2) / 400


def test_no_ramp_means_full_batch():
    assert accumulation_at(0, cfg(), 16, 2) == 16
