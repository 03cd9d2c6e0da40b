"""A launched process stops when its launcher dies, even by SIGKILL: every level of
`pretrain train --nproc N` -> torchrun agent -> ranks, and Ray node launcher -> ranks.
Light on imports: the Ray launcher's actors load it too."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

# Our launchers (`pretrain train`, trainer.launch's torchrun, the Ray node launcher) put their pid here
# for the processes they start.
LAUNCHER_PID = "PRETRAIN_LAUNCHER_PID"
# After SIGTERM, how long an orphan may take to finish its step and checkpoint before SIGKILL.
ORPHAN_GRACE_S = 10.0


def exit_with_launcher(grace_s: float = ORPHAN_GRACE_S, poll_s: float = 0.5) -> None:
    """Once the launcher is gone: SIGTERM to this process (a rank checkpoints at the end of its step,
    torchrun stops its ranks), then SIGKILL after `grace_s` (a rank can hang in a collective whose
    peer is gone). The launcher is $PRETRAIN_LAUNCHER_PID when set, else the parent. A watchdog thread
    rather than prctl(PR_SET_PDEATHSIG): that signal follows the *thread* that forked, and threaded
    launchers (Ray actors) may end that thread while the process lives on."""
    given = os.environ.get(LAUNCHER_PID)
    launcher, parent = int(given) if given else os.getppid(), os.getppid()
    threading.Thread(target=_watch, args=(launcher, parent, grace_s, poll_s), daemon=True,
                     name="launcher-watchdog").start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid now belongs to another user
        return False
    return True


def _watch(launcher: int, parent: int, grace_s: float, poll_s: float) -> None:
    # Re-parenting shows a dead parent; the pid check also catches a launcher that died before we started.
    while os.getppid() == parent and _alive(launcher):
        time.sleep(poll_s)
    print(f"launcher (pid {launcher}) is gone: stopping process {os.getpid()}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)
