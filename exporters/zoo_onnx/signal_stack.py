"""Keep the calling thread's alternate signal stack valid across OpenVINO's `compile_model`.

Why this exists: OpenVINO 2026.4's CPU plugin installs an alternate signal stack (`sigaltstack`)
on the thread that compiles a model, remembering the one it replaced, and puts that one back and
frees its own when the compiled model is destroyed. With two compiled models alive at once,
destroyed in the order they were made (what a validation that compiles at the defaults and again
at f32 does on its way out), the second one puts back the first one's stack, already freed. The
thread is left with a dangling signal stack, and the next Python-handled signal on it (Ctrl-C, the
export step budget's SIGALRM, pytest-timeout's) crashes the process with SIGSEGV instead of running
its handler: the test suite's workers died that way in the step-budget tests, and a `zoo export`
interrupted after its OpenVINO validation would die the same way, without cleaning its staging folder.

`kept()` around each compile puts the stack that was there before back as soon as the compile
returns, so every compiled model remembers that one (never another compiled model's) and restores
it on destruction, in any order. Compile through `openvino_ir.compile_for_consumer`, which does.
On platforms where the layout of `stack_t` is not known here (not Linux or macOS) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Iterator


class StackT(ctypes.Structure):
    """POSIX `stack_t`: Linux orders it sp, flags, size; macOS sp, size, flags."""

    _fields_ = ([("ss_sp", ctypes.c_void_p), ("ss_size", ctypes.c_size_t), ("ss_flags", ctypes.c_int)]
                if sys.platform == "darwin" else
                [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)])


def _libc():
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sigaltstack.argtypes = [ctypes.POINTER(StackT), ctypes.POINTER(StackT)]
        libc.sigaltstack.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def current() -> StackT | None:
    """The calling thread's alternate signal stack (None where it cannot be read)."""
    if _LIBC is None:
        return None
    out = StackT()
    return out if _LIBC.sigaltstack(None, ctypes.byref(out)) == 0 else None


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """Run the body, then give the calling thread back the signal stack it had before."""
    before = current()
    try:
        yield
    finally:
        if before is not None and _LIBC is not None:
            _LIBC.sigaltstack(ctypes.byref(before), None)
