"""Everything else is in pyproject.toml; this ships pretrain_lm_eval_hook.pth into site-packages, which
setuptools' configuration cannot express: a .pth is read only from a site-packages directory itself."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "pretrain_lm_eval_hook.pth"
ROOT = Path(__file__).resolve().parent


class BuildPyWithPth(build_py):
    """A wheel's purelib root is build_lib, so a copy there lands in site-packages."""

    def run(self):
        super().run()
        if not self.editable_mode:
            shutil.copyfile(ROOT / PTH, Path(self.build_lib) / PTH)

    def get_outputs(self, *args, **kwargs):
        outputs = list(super().get_outputs(*args, **kwargs))
        return outputs if self.editable_mode else [*outputs, str(Path(self.build_lib) / PTH)]


class StrategyWithPth:
    """setuptools' editable strategy, then our .pth beside the ones it writes."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH, (ROOT / PTH).read_bytes())


class EditableWheelWithPth(editable_wheel):
    """An editable wheel holds only what its strategy writes (a .pth and a finder for the source tree),
    not build_lib. _select_strategy is setuptools-internal: tests/trainer/test_lm_eval_plugin.py installs
    the project editable and runs `lm_eval --model pretrain`, so a setuptools that changes it fails there."""

    def _select_strategy(self, *args, **kwargs):
        return StrategyWithPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
