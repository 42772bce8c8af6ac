"""Which tests a parallel run (`-n 2 --dist loadgroup`, pyproject's addopts) keeps on one worker.

A module's tests stay together, so its module-scoped fixtures (a trained run, an export) are built
once; the docs blocks of one document, or of one `<!-- session: fresh -->` part of it, stay
together, because each block runs after the earlier blocks of its session (tests/test_docs.py) and
a block landing on the other worker would run them all again there. The parts of a document can
run side by side.

Why a scheduler and not `xdist_group` marks: with pytest 9.2 xdist's way of applying the marks
(appending "@group" to the item's node id) no longer takes effect, silently
(pytest-dev/pytest-xdist#1386), and every group fell apart: docs blocks reran their predecessors on
both workers and the suite took 15-18 minutes (fresh-venv CI: 17:46 before, 13:44 and 15:23 after). The
grouping is decided here from the node id alone, on the controller, whatever the versions.

Order: the work units go out longest first (the classic longest-processing-time rule), so that no
long unit starts last while the other worker sits idle. xdist's own order (most tests first) sent
docs/bench.md, one block of 130 s, last of all. The lengths are what a run measured (`SECONDS`;
stale numbers only make the order worse, never a result wrong), others 1 s per test.
"""

from __future__ import annotations

from functools import lru_cache

from xdist.scheduler import LoadScopeScheduling

DOC_TEST = "tests/test_docs.py::test_doc_block["
# Seconds each long work unit took (sum of its tests' durations, `python -m pytest --durations=0`
# on 2 cores, 2026-12-06); the whole suite's tests: 1750 s, 400 tests in the units not listed: 419 s.
SECONDS = {
    "doc:README.md": 374, "tests/test_journey.py": 135, "doc:docs/bench.md": 131, "doc:README.md#1": 117,
    "tests/test_export_targets.py": 104, "tests/test_bench.py": 79, "tests/test_export_roundtrip.py": 78,
    "tests/test_export_int8.py": 70, "tests/test_training.py": 54, "tests/test_export_real_weights.py": 52,
    "tests/test_pretrained_head.py": 50, "tests/test_export_artifacts.py": 46, "tests/test_typing.py": 41,
}
SECONDS_PER_TEST = 1.0


@lru_cache(maxsize=1)
def _doc_sessions() -> dict[str, str]:
    from test_docs import RUNNABLE  # the controller reads the docs the same way the workers do

    return {b.id: b.session_key for b in RUNNABLE}


def group_of(nodeid: str) -> str:
    """The work unit a test belongs to: "doc:<session key>" for a docs block, else its module."""
    if nodeid.startswith(DOC_TEST) and nodeid.endswith("]"):
        key = _doc_sessions().get(nodeid[len(DOC_TEST):-1])
        if key is not None:
            return f"doc:{key}"
    return nodeid.split("::", 1)[0]


def longest_first(units: dict[str, dict]) -> list[str]:
    """The work units (group -> its tests) in the order they are handed out: longest expected first."""
    return sorted(units, key=lambda group: -SECONDS.get(group, SECONDS_PER_TEST * len(units[group])))


class GroupScheduling(LoadScopeScheduling):
    """xdist's load-scope scheduling (whole work units to one worker) with `group_of` as the scope,
    the units handed out longest first."""

    _ordered = False

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid)

    def _assign_work_unit(self, node) -> None:  # noqa: ANN001 - xdist's WorkerController
        if not self._ordered:  # the first assignment: the work queue is complete, nothing handed out yet
            self._ordered = True
            units = dict(self.workqueue)
            self.workqueue.clear()
            self.workqueue.update((group, units[group]) for group in longest_first(units))
        super()._assign_work_unit(node)
