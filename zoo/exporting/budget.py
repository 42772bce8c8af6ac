"""Every export step has a time budget: a step still running when its budget is spent stops with
`StepTimeout`, one line naming the step, the budget and the fix, instead of hanging for ever (a
dynamo export of a backbone with size-dependent padding once ran 886 s without a word).

The budget is `--step-budget SECONDS` / `zoo.export(step_budget=...)`, else $ZOO_EXPORT_STEP_BUDGET,
else `default_budget(model)`: generous (15 minutes plus a minute per million parameters: EfficientNet-Lite0
about 20 minutes, against 2 minutes for its slowest step on an idle 2-core machine), so only a
step that is stuck hits it. On the main thread the step is interrupted by SIGALRM (setitimer); on
another thread (where signals cannot be used) by an asynchronous exception sent to that thread.
Both act between Python bytecodes: a step stuck inside one native call stops when that call
returns. The caller's staging logic then deletes the half-written artifact and keeps the earlier
one (`zoo.exporting.run`).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import threading
import time
from typing import Any, Iterator

from ..errors import ZooError

ENV_BUDGET = "ZOO_EXPORT_STEP_BUDGET"
BASE_SECONDS = 900.0
SECONDS_PER_MILLION_PARAMETERS = 60.0


class StepTimeout(ZooError):
    """An export step ran past its time budget (exit 2: nothing of that format was put in place)."""


class _Expired(BaseException):
    """Raised into the step when its budget is spent; turned into StepTimeout at the budget's edge.
    A BaseException, so the step's own `except Exception` handlers cannot swallow it."""


def default_budget(model: Any) -> float:
    """Seconds per step for this model: BASE_SECONDS + SECONDS_PER_MILLION_PARAMETERS per million
    parameters (a step of a large model legitimately takes longer)."""
    try:
        params = int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - a model without parameters() gets the base budget
        params = 0
    return BASE_SECONDS + SECONDS_PER_MILLION_PARAMETERS * params / 1e6


def resolve_budget(given: float | None, model: Any) -> float:
    """The budget in seconds: `given`, else $ZOO_EXPORT_STEP_BUDGET, else `default_budget(model)`."""
    source = "--step-budget"
    if given is None and os.environ.get(ENV_BUDGET, "").strip():
        source, raw = ENV_BUDGET, os.environ[ENV_BUDGET].strip()
        try:
            given = float(raw)
        except ValueError:
            raise ZooError(f"{ENV_BUDGET}={raw!r} is not a number of seconds; set it to e.g. 900 or unset it") from None
    if given is None:
        return default_budget(model)
    if not math.isfinite(given) or given <= 0:
        raise ZooError(f"{source} must be a positive number of seconds, got {given!r}")
    return float(given)


@contextlib.contextmanager
def budget(step: str, seconds: float) -> Iterator[None]:
    """Run the body as the export step `step`; StepTimeout once it has run `seconds`."""
    main = threading.current_thread() is threading.main_thread()
    stop = _alarm(seconds) if main else _async_stop(threading.get_ident(), seconds)
    try:
        with stop:
            yield
    except _Expired:
        raise StepTimeout(
            f"{step} did not finish within its time budget of {seconds:g} s and was stopped; nothing of it was put "
            f"in place (an earlier artifact is kept). If it is only slow, give it more time with --step-budget "
            f"SECONDS (or {ENV_BUDGET}); if it hangs, try another format or option (zoo export --help)") from None


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds`. An enclosing timer (a budget around this one, pytest-timeout's) keeps
    its own deadline: whichever is due first fires, the enclosing one through its own handler, and
    it is re-armed on the way out."""
    start = time.monotonic()
    own_deadline = start + seconds
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    outer_deadline = start + outer_left if outer_left > 0 else math.inf

    def expire(signum: int, frame: Any) -> None:
        nonlocal outer_deadline
        now = time.monotonic()
        if now >= own_deadline - 1e-3 or not callable(previous):
            raise _Expired()
        outer_deadline = math.inf  # the enclosing timer's turn: its handler decides (and may raise)
        previous(signum, frame)
        signal.setitimer(signal.ITIMER_REAL, max(own_deadline - time.monotonic(), 1e-3))

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(min(own_deadline, outer_deadline) - start, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_deadline < math.inf:
            signal.setitimer(signal.ITIMER_REAL, max(outer_deadline - time.monotonic(), 1e-3))


@contextlib.contextmanager
def _async_stop(thread_id: int, seconds: float) -> Iterator[None]:
    """Off the main thread: a timer thread raises _Expired in this thread (CPython's
    PyThreadState_SetAsyncExc), disarmed before the body's thread leaves the budget."""
    lock = threading.Lock()
    armed = [True]

    def expire() -> None:
        with lock:
            if armed[0]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(_Expired))

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            armed[0] = False
        timer.cancel()
