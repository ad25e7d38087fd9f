"""``torch.compile`` for the spiking towers, with eager execution as the fallback.

The towers are compiled in place with ``nn.Module.compile``, so parameter names, ``state_dict`` and
checkpoints stay those of the eager model. spikingjelly's LIF neurons are registered custom operators
(``torch.ops.sj_lif``) with their own autograd formula, so the compiled graph calls the same neuron
dynamics and surrogate gradients as eager execution and fuses the layers around them.

Compilation happens at the first call. ``compile_model`` refuses up front where compilation cannot
work (no C++ compiler for the CPU backend, no Triton for CUDA, a Python that dynamo does not
support); ``run_with_fallback`` catches a compiler failure at the first call, restores eager
execution and runs the call again.
"""
import logging
import shutil
from typing import Callable, List, Optional, TypeVar

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = ["compile_model", "compile_unavailable_reason", "is_compiled", "restore_eager", "run_with_fallback"]

_Result = TypeVar("_Result")
_CXX_COMPILERS = ("g++", "c++", "clang++")


def towers(model: nn.Module) -> List[nn.Module]:
    """The image and text towers of an open_clip model, or ``[model]`` for a bare tower."""
    found = [getattr(model, name) for name in ("visual", "text") if isinstance(getattr(model, name, None), nn.Module)]
    return found or [model]


def compile_unavailable_reason(device: torch.device, backend: str = "inductor") -> Optional[str]:
    """Why ``torch.compile`` with ``backend`` cannot run on ``device`` here, or None when it can."""
    try:
        import torch._dynamo

        torch._dynamo.is_dynamo_supported()  # raises on an unsupported Python
    except (ImportError, RuntimeError) as error:
        return f"torch.compile is not supported in this environment: {error}"
    if backend != "inductor":
        return None
    if device.type == "cpu" and not any(shutil.which(name) for name in _CXX_COMPILERS):
        return "the inductor backend needs a C++ compiler on the CPU and none of g++, c++, clang++ is on PATH"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "the inductor backend needs Triton on CUDA devices; pip install triton"
    return None


def compile_model(model: nn.Module, device: torch.device, backend: str = "inductor",
                  mode: Optional[str] = None) -> bool:
    """Compile the towers of ``model`` in place; returns False, after a log line, when compilation is
    unavailable on ``device`` and the model stays eager."""
    reason = compile_unavailable_reason(device, backend)
    if reason is not None:
        _logger.warning("running eager: %s", reason)
        return False
    for tower in towers(model):
        tower.compile(backend=backend, mode=mode)
    _logger.info("compiled %s with torch.compile (backend %s)",
                 " and ".join(type(tower).__name__ for tower in towers(model)), backend)
    return True


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(module, "_compiled_call_impl", None) is not None for module in model.modules())


def restore_eager(model: nn.Module) -> None:
    """Undo ``nn.Module.compile`` on ``model`` and every submodule."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def _compile_error_types() -> tuple:
    types = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        types.append(TorchDynamoException)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import InductorError

        types.append(InductorError)
    except ImportError:
        pass
    return tuple(types)


def is_compile_error(error: BaseException) -> bool:
    """Return whether ``error``, or an exception it was raised from, comes from dynamo or inductor."""
    types = _compile_error_types()
    seen = set()
    while error is not None and id(error) not in seen:
        if types and isinstance(error, types):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _describe(error: BaseException) -> str:
    """``Type: first line`` of the innermost exception that ``error`` was raised from."""
    root, seen = error, set()
    while id(root) not in seen:
        seen.add(id(root))
        # dynamo's BackendCompilerFailed keeps the backend's exception as inner_exception.
        inner = root.__cause__ or getattr(root, "inner_exception", None)
        if not isinstance(inner, BaseException):
            break
        root = inner
    lines = [line for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0][:300] if lines else ''}"


def run_with_fallback(model: nn.Module, call: Callable[[], _Result], before_retry: Callable[[], None] = None) -> _Result:
    """Run ``call()``; when ``model`` is compiled and the compiler fails, restore eager execution,
    log why, run ``before_retry()`` and run ``call()`` again.

    Use it around the first forward and backward pass of a compiled model, where compilation happens.
    Errors that do not come from the compiler propagate unchanged.
    """
    if not is_compiled(model):
        return call()
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - filtered by is_compile_error
        if not is_compile_error(error):
            raise
        _logger.warning("torch.compile failed (%s); continuing with eager execution", _describe(error))
        restore_eager(model)
        if before_retry is not None:
            before_retry()
        return call()
