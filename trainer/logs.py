"""Where a rank's messages go: the trainer's own to the terminal (rank 0 from INFO, the others from
WARNING); everything, library warnings and DeepSpeed's messages included, to RUN/logs/rank-R.log."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import Iterator


class _TerminalFilter(logging.Filter):
    """The trainer's messages from `level` on; other libraries' only when they are errors."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "trainer" or record.name.startswith("trainer.")
        return record.levelno >= (self.level if ours else logging.ERROR)


def setup_logging(rank: int, run_dir: Path) -> Path:
    """Returns the rank's log file."""
    path = run_dir / "logs" / f"rank-{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    terminal.addFilter(_TerminalFilter(logging.INFO if rank == 0 else logging.WARNING))
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[terminal, file], force=True)
    logging.captureWarnings(True)  # deprecations inside DeepSpeed and torch: the log file, not the terminal
    deepspeed_log = logging.getLogger("DeepSpeed")  # has its own stdout handler; send it through ours
    deepspeed_log.handlers.clear()
    deepspeed_log.propagate = True
    return path


@contextlib.contextmanager
def stdout_to_log(name: str) -> Iterator[None]:
    """Lines a library print()s (DeepSpeed's comm-op build notice) go to the log at INFO."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            logging.getLogger(name).info(line)
