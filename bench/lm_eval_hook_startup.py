"""What pretrain_lm_eval_hook.pth adds to every interpreter start: `python -c pass` in two throwaway venvs
that differ only by that .pth and its module, byte-compiled in site-packages as pip installs them (both
read this environment's site-packages as a plain path), timed in interleaved pairs; plus `-X importtime`'s
figure for the hook module itself.

    python bench/lm_eval_hook_startup.py [--pairs 40] [--rounds 5]
"""
from __future__ import annotations

import argparse
import py_compile
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOOK_PTH = "pretrain_lm_eval_hook.pth"


def make_venv(path: Path, with_hook: bool) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                           text=True).strip())
    (purelib / "paths.pth").write_text(f"{sysconfig.get_path('purelib')}\n")
    if with_hook:
        (purelib / HOOK_PTH).write_text((REPO / HOOK_PTH).read_text())
        module = purelib / "pretrain_lm_eval_hook.py"
        module.write_text((REPO / module.name).read_text())
        py_compile.compile(str(module), doraise=True)  # pip byte-compiles what it installs
    return python


def start_seconds(python: Path) -> float:
    t = time.perf_counter()
    subprocess.run([str(python), "-c", "pass"], check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with_hook, without = make_venv(Path(tmp, "hook"), True), make_venv(Path(tmp, "plain"), False)
        check = "import sys; print(any(type(f).__name__ == 'type' and f.__name__ == 'LmEvalModelsFinder' for f in sys.meta_path))"
        assert subprocess.check_output([str(with_hook), "-c", check], text=True).strip() == "True"
        own = []
        for _ in range(15):
            stderr = subprocess.run([str(with_hook), "-X", "importtime", "-c", "pass"], capture_output=True,
                                    text=True).stderr
            line = next(l for l in stderr.splitlines() if l.rstrip().endswith("pretrain_lm_eval_hook"))
            own.append(int(line.split("|")[0].split(":")[1]))
        print(f"-X importtime, pretrain_lm_eval_hook (self): median {statistics.median(own)} us, "
              f"range {min(own)}-{max(own)} us over 15 starts")
        for python in (with_hook, without):  # warm the page cache
            start_seconds(python)
        ratios, medians = [], []
        for r in range(args.rounds):
            a, b = [], []
            for i in range(args.pairs):  # alternate which goes first within a pair
                first, second = (with_hook, without) if i % 2 == 0 else (without, with_hook)
                t1, t2 = start_seconds(first), start_seconds(second)
                (a.append(t1), b.append(t2)) if i % 2 == 0 else (b.append(t1), a.append(t2))
            ratio = statistics.median(x / y for x, y in zip(a, b))
            ratios.append(ratio)
            medians.append((statistics.median(a), statistics.median(b)))
            print(f"round {r}: with hook {medians[-1][0] * 1e3:.1f} ms, without {medians[-1][1] * 1e3:.1f} ms, "
                  f"median paired ratio {ratio:.3f}")
        print(f"paired ratio with/without over {args.rounds} rounds: median {statistics.median(ratios):.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
