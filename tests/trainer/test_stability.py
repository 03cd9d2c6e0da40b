import pytest

from tests.trainer.conftest import make_run, read_metrics, train_in_process
from trainer import testing_hooks
from trainer.errors import TrainError
from trainer.stability import SpikeMonitor


@pytest.mark.parametrize("zero", [0, 1])
def test_nonfinite_loss_is_skipped_and_counted(tmp_path, shard_dir, capfd, monkeypatch, zero):
    run = make_run(tmp_path / "run", shard_dir, train={"max_steps": 6}, parallel={"zero_stage": zero})
    monkeypatch.setenv(testing_hooks.NONFINITE_STEP, "3")
    assert train_in_process(run) == 0
    m = read_metrics(run)
    assert [m[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert m[3]["grad_norm"] is None and all(m[s]["grad_norm"] is not None for s in (2, 4, 5, 6))
    assert all(m[s]["loss"] < 11 for s in (4, 5, 6))  # the update was skipped, not applied with NaNs
    assert "step 3: non-finite loss or gradient" in capfd.readouterr().err


def test_monitor_needs_consecutive_spikes_over_the_running_mean():
    mon = SpikeMonitor(factor=1.5, patience=3)
    assert not any(mon.update(x) for x in [4.0, 3.9, 3.8, 7.0, 3.7, 7.0, 7.0])
    assert mon.update(7.0)  # third in a row
    assert mon.history[-1] == 3.7  # spikes stay out of the mean


def test_loss_spike_rolls_back_then_gives_up_if_it_recurs(tmp_path, shard_dir, capfd):
    # factor 0.5: every step after the first two counts as a spike.
    run = make_run(tmp_path / "run", shard_dir, train={"max_steps": 10, "loss_spike_factor": 0.5,
                                                       "loss_spike_patience": 2}, checkpoint={"interval": 3})
    with pytest.raises(TrainError, match="loss spiked again after rolling back to step-3"):
        train_in_process(run)
    err = capfd.readouterr().err
    assert "loss spike for 2 steps at step 4: rolled back to step-3 and skipped the 1 steps of batches since" in err
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 6  # 1..4, then 4 and 5 again on fresh batches
