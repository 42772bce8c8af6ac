"""Run one measurement in a fresh child process (multiprocessing "spawn").

Why: on CPU the only honest peak-memory number is the peak RSS of a process that did nothing
but this measurement; a child also keeps allocator caches, compiled kernels and thread pools of
one measurement from leaking into the next. The child reports its own peak RSS (VmHWM; see
measure.peak_rss_mb for why not ru_maxrss, which Linux carries over from the parent). A child that
crashes (segfault, OOM kill) or runs past the timeout becomes an error row.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from typing import Any

from .measure import Task, base_row


def _child(task_dict: dict, conn) -> None:
    try:
        from .measure import measure

        row = measure(task_dict)
        conn.send(row)
    finally:
        conn.close()


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except (ValueError, TypeError):
        return f"signal {-code}"


def measure_in_child(task: Task, timeout: float | None = None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(task.to_dict(), send), daemon=True)
    proc.start()
    send.close()  # the child holds the only write end: EOF here means it is gone
    row, timed_out = None, False
    try:
        if recv.poll(timeout):  # a result, or EOF because the child died
            try:
                row = recv.recv()
            except EOFError:
                row = None
        else:
            timed_out = True
    finally:
        recv.close()
        proc.join(10 if row is not None else (0 if timed_out else 5))
        if proc.is_alive():
            proc.kill()
            proc.join()
    if row is not None:
        return row
    row = base_row(task)
    code = proc.exitcode
    if timed_out:
        row["error"] = f"Timeout: the measurement ran past {timeout:g}s and was killed"
    elif code is not None and code < 0:
        hint = " (killed: out of memory?)" if code == -signal.SIGKILL else ""
        row["error"] = f"ChildCrashed: the measuring process died of {_signal_name(code)}{hint}"
    else:
        row["error"] = f"ChildCrashed: the measuring process exited with status {code} and no result"
    return row
