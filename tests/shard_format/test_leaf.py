import os
import subprocess
import sys


def test_the_contract_imports_neither_side(repo_root):
    """DESIGN.md: both packages import shard_format, and it imports neither (nor the CLI)."""
    code = ("import sys, shard_format; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'trainer', 'data_pipeline', 'cluster'}))")
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo_root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
