"""Loss-spike detection for PaLM's remedy (Chowdhery et al. 2022, sec. 5.1): when the loss stays
above `factor` x its running mean for `patience` consecutive steps, roll back to the last checkpoint
and skip the batches seen since, instead of training on through the spike."""
from __future__ import annotations

import math
from collections import deque


class SpikeMonitor:
    def __init__(self, factor: float, patience: int, window: int = 20):
        self.factor, self.patience = factor, patience
        self.history: deque[float] = deque(maxlen=window)
        self.consecutive = 0

    def update(self, loss: float) -> bool:
        """Feed one step's loss; True when the run should roll back. Spikes stay out of the mean."""
        if not math.isfinite(loss):
            return False
        mean = sum(self.history) / len(self.history) if self.history else None
        # A few steps of history first: the very first losses have nothing to be compared with.
        if mean is not None and len(self.history) >= min(self.patience, self.history.maxlen) and loss > self.factor * mean:
            self.consecutive += 1
            return self.consecutive >= self.patience
        self.consecutive = 0
        self.history.append(loss)
        return False

    def reset(self) -> None:
        self.consecutive = 0

    def state(self) -> dict:
        return {"history": list(self.history), "consecutive": self.consecutive}

    def load_state(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.consecutive = state["consecutive"]
