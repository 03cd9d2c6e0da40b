"""Registers `pretrain` with lm-evaluation-harness, so the bare `lm_eval --model pretrain ...` works.

lm-eval 0.4 has no plugin entry points: its CLI knows the models that `lm_eval.models` registers on
import. `pretrain_lm_eval_hook.pth`, which the install puts in site-packages (setup.py), imports this
module at every interpreter start and calls install(), which only puts a finder first on sys.meta_path.
That finder waits for `lm_eval.models` to be imported, registers the lazy placeholder "pretrain" ->
"trainer.harness:PretrainLM" once that module has run, and removes itself. Nothing of lm_eval, torch or
this project is imported until lm-eval itself is.
"""
import sys

MODEL = "pretrain"
TARGET = "trainer.harness:PretrainLM"
WATCHED = "lm_eval.models"


def register() -> None:
    """Add the placeholder unless `pretrain` is registered already (a concrete class stays)."""
    from lm_eval.api.registry import model_registry

    if MODEL not in model_registry:
        model_registry.register(MODEL, target=TARGET)


class LmEvalModelsFinder:
    """A meta-path finder that finds nothing itself: it wraps the real loader of `lm_eval.models`."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != WATCHED:
            return None
        if cls in sys.meta_path:
            sys.meta_path.remove(cls)  # one import to watch: later ones cost nothing
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run_module = spec.loader.exec_module

                def exec_module(module, run_module=run_module):
                    run_module(module)
                    try:
                        register()
                    except Exception as e:  # a changed lm-eval must not break `import lm_eval` for everyone
                        import warnings

                        warnings.warn(f"pretrain: could not register --model {MODEL} with lm-eval: {e!r}")

                spec.loader.exec_module = exec_module
                return spec
        return None


def install() -> None:
    """What the .pth runs at start-up; once lm_eval.models is imported there is nothing left to watch."""
    if WATCHED not in sys.modules and LmEvalModelsFinder not in sys.meta_path:
        sys.meta_path.insert(0, LmEvalModelsFinder)
