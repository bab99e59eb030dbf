"""``import esta`` makes transformers' Auto classes know esta's model types, without importing transformers.

The Auto classes live in ``transformers.models.auto``. If it is already imported, esta registers at once; if not, a
one-shot import hook registers right after it is (``from transformers import AutoModel`` after ``import esta``), so
``import esta`` stays cheap (the command line starts in a tenth of a second) and registration never needs
``trust_remote_code``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from importlib.abc import MetaPathFinder

_AUTO = "transformers.models.auto"
log = logging.getLogger("esta")


def _register() -> None:
    # importing esta.hf_native registers (its last line); if it is the module whose import pulled in the Auto
    # classes, it is already in sys.modules, half-run, and registers when its import ends
    try:
        importlib.import_module(f"{__package__}.hf_native")
    except Exception as e:  # noqa: BLE001 - never break the user's import of transformers
        log.warning("esta could not register its model types with transformers' Auto classes: %s", e)


class _AfterAutoImport(MetaPathFinder):
    def find_spec(self, fullname: str, path, target=None):  # noqa: ANN001 - the finder protocol
        if fullname != _AUTO:
            return None
        sys.meta_path.remove(self)  # one shot; the spec below comes from the other finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            run(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _AUTO in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterAutoImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterAutoImport())


def quiet_libraries() -> None:
    """For the command line: transformers' load reports and weight-loading bars would bury esta's own progress
    (set without importing transformers now: its logging reads these when it is first imported)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (a test calling main): set it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
