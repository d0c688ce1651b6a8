"""Mixed precision (AMP) and ``torch.compile`` switches shared by fit, predict and embed.

``amp``: ``False`` (float32), ``True`` or ``"bf16"`` (bfloat16 autocast), ``"fp16"`` (float16 autocast).
Autocast (Micikevicius et al. 2018, "Mixed Precision Training", ICLR) runs matrix products in the low
precision and keeps reductions, softmax and normalisation in float32; bfloat16 keeps float32's range and
needs no loss scaling. On GPUs with tensor cores both are several times faster than float32; on CPUs
without bfloat16/float16 matrix units they are usually slower, so they are never switched on implicitly.

``compile``: ``False``, ``True`` (:func:`torch.compile` with its default ``"inductor"`` backend) or the
name of a backend (e.g. ``"aot_eager"``, which traces without generating code). Shapes are marked
dynamic: windows, crops and last batches of different sizes reuse one compiled graph.
"""

from __future__ import annotations

import contextlib
from typing import Any

_AMP = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "16": "float16"}
_LIGHTNING = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}


def amp_dtype_name(amp: bool | str | None) -> str | None:
    """``"bfloat16"``, ``"float16"`` or ``None`` (no autocast) for an ``amp`` option; a ``ValueError`` otherwise."""
    if amp is None or amp is False:
        return None
    if amp is True:
        return "bfloat16"
    if isinstance(amp, str) and amp.lower() in _AMP:
        return _AMP[amp.lower()]
    raise ValueError(f"amp must be False, True, 'bf16' or 'fp16', got {amp!r}.")


def lightning_precision(amp: bool | str | None) -> str | None:
    """The Lightning ``Trainer(precision=...)`` of an ``amp`` option (``None``: leave the default)."""
    name = amp_dtype_name(amp)
    return None if name is None else _LIGHTNING[name]


def check_compile(compile: bool | str | None) -> str | None:
    """The backend of a ``compile`` option (``None``: no compilation); a ``ValueError`` otherwise."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "inductor"
    if isinstance(compile, str) and compile:
        return compile
    raise ValueError(f"compile must be False, True or a torch.compile backend name, got {compile!r}.")


def autocast(device: Any, amp: bool | str | None):
    """A :func:`torch.autocast` context for ``device`` and ``amp`` (a no-op context without AMP)."""
    import torch

    name = amp_dtype_name(amp)
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, name))


def compiled(module: Any, compile: bool | str | None) -> Any:
    """``module`` itself, or a :func:`torch.compile` wrapper of it (the module is not modified)."""
    backend = check_compile(compile)
    if backend is None:
        return module
    import torch

    return torch.compile(module, backend=backend, dynamic=True)


def compile_in_place(module: Any, compile: bool | str | None) -> bool:
    """Compile ``module``'s forward in place (:meth:`torch.nn.Module.compile`: same type and state-dict keys).

    Returns whether it was compiled; undo with :func:`uncompile`.
    """
    backend = check_compile(compile)
    if backend is None:
        return False
    module.compile(backend=backend, dynamic=True)
    return True


def uncompile(module: Any) -> None:
    """Drop the compiled forward set by :func:`compile_in_place` (the module runs eagerly again)."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        module._compiled_call_impl = None
