"""The trainer: models, the DeepSpeed engine, data loading, checkpoints, metrics, eval and export."""
import os

# DeepSpeed falls back to the CPU on a machine without a GPU driver, but warns on every import; say it up front.
if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/kfd")):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
