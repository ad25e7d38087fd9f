"""Post-import hook that registers this package with timm, open_clip and clip_benchmark.

The ``open_clip_spiking_autoregister.pth`` file in site-packages imports this package at interpreter
start. That import costs only the standard library: it adds a finder to ``sys.meta_path`` that waits
for ``timm``, ``open_clip`` or ``clip_benchmark.models`` to finish importing and then registers with
that package. Nothing heavy is imported until the user imports one of them.
"""
import importlib.abc
import importlib.util
import logging
import sys
import threading

_logger = logging.getLogger(__name__)

# Module name -> name of the function in ``registration`` that registers with it.
_WATCHED_MODULES = {
    "timm": "register_timm",
    "open_clip": "register_open_clip",
    "clip_benchmark.models": "register_clip_benchmark",
}

_lock = threading.RLock()
_installed = False


def _run_registration(module_name: str) -> None:
    from . import registration

    getattr(registration, _WATCHED_MODULES[module_name])()


class _LoaderWithHook(importlib.abc.Loader):
    """Delegates to the original loader, then registers once the module body has run."""

    def __init__(self, loader, module_name: str):
        self._loader = loader
        self._module_name = module_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _run_registration(self._module_name)
        except Exception:
            # A failing plugin must not break the user's import of open_clip or timm.
            _logger.exception("open_clip_spiking failed to register with %s", self._module_name)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self._in_progress = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED_MODULES or fullname in self._in_progress:
            return None
        self._in_progress.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._in_progress.discard(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _LoaderWithHook(spec.loader, fullname)
        return spec


def install() -> None:
    """Install the finder once; register at once with watched modules that are already imported."""
    global _installed
    with _lock:
        if not _installed:
            sys.meta_path.insert(0, _PostImportFinder())
            _installed = True
    for module_name in _WATCHED_MODULES:
        if module_name in sys.modules:
            _run_registration(module_name)
