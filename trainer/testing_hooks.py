"""Fault injection for the tests, off unless a PRETRAIN_TEST_* variable is set. The environment
reaches every rank (torchrun and Ray workers inherit it), and the user's config carries no test knobs."""
from __future__ import annotations

import os
import time
from typing import Optional

NONFINITE_STEP = "PRETRAIN_TEST_NONFINITE_STEP"  # the optimizer step whose loss is made non-finite
STEP_DELAY_S = "PRETRAIN_TEST_STEP_DELAY_S"  # sleep after each step: a window to kill a run mid-way
PAUSE_BEFORE_COMMIT_S = "PRETRAIN_TEST_PAUSE_BEFORE_COMMIT_S"  # between writing a checkpoint and marking it complete
SAVE_AT_START = "PRETRAIN_TEST_SAVE_AT_START"  # a checkpoint of the initial weights (step 0) before training


def nonfinite_step() -> Optional[int]:
    value = os.environ.get(NONFINITE_STEP)
    return int(value) if value else None


def _sleep(variable: str) -> None:
    seconds = float(os.environ.get(variable) or 0)
    if seconds:
        time.sleep(seconds)


def after_step() -> None:
    _sleep(STEP_DELAY_S)


def before_commit() -> None:
    _sleep(PAUSE_BEFORE_COMMIT_S)


def save_at_start() -> bool:
    return bool(os.environ.get(SAVE_AT_START))
