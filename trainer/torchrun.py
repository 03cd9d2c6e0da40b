"""`python -m trainer.torchrun ARGS`: torchrun (`torch.distributed.run`, same arguments), reporting a
rank's user error once.

A rank that hits a TrainError prints `error: ...` and exits 2 (trainer.main). Plain torchrun then
prints a Python traceback of its own ChildFailedError under it, which reads like a crash. This
wrapper exits 2 quietly instead. Any other failure gets torchrun's failure summary (each rank has
already printed its own traceback) and exit status 1, as torchrun gives.
"""
from __future__ import annotations

import sys
from typing import Optional

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

USER_ERROR = 2  # trainer.main's exit status for a TrainError


def main(argv: Optional[list[str]] = None) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        # The agent stops the other ranks with a signal (negative exit code) once one has failed.
        if USER_ERROR in codes and all(code == USER_ERROR or code < 0 for code in codes):
            return USER_ERROR
        print(e.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
