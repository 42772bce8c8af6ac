"""The documentation is the acceptance test: every command and snippet in README.md and docs/*.md runs.

Each ```bash block (and ```sh/```shell/```console) and each ```python block of README.md and
docs/*.md is extracted and executed as written, in document order. The blocks of one document
share one session, as a user's terminal would: one temporary working directory (so `zoo train`
then `zoo export runs/...` then `zoo predict ...` see each other's files) and one feature cache
(ZOO_CACHE_DIR, its own per document); TORCH_HOME is shared. Shell blocks run in bash with `set -e -o pipefail`; each
Python block runs in a fresh interpreter in that working directory.

What the fixture may supply, and nothing else (no flag is added to any command):
- the data the docs name: `teapots/`, `holdout/`, `photos/`, `photo.jpg` (small folders of real
  photos: crops of scikit-image's bundled pictures, one class per picture);
- torchvision's MobileNetV2 ImageNet weights from ../shared, linked into TORCH_HOME/hub/checkpoints
  (what torchvision would download); HF_HUB_OFFLINE=1 (conftest.py);
- PATH with this interpreter's bin directory first, so `zoo` and `python` are this installation's.

Markers, an HTML comment on the line(s) just before a block (invisible on GitHub):
- `<!-- not-run: REASON -->`: the block is not executed (the reason is required), e.g. the set-up
  commands, which .ci/run itself runs.
- `<!-- expect: exit=N stderr="TEXT" stdout="TEXT" -->`: the block (one command) must exit with N and
  print TEXT (a substring); without `exit=` the block must succeed and print TEXT.
- `<!-- session: fresh -->`: a reader may start here. This block and the ones after it (up to the
  next such marker) run in a new session of their own: a new working directory with the fixture's
  data and a new feature cache, none of the earlier blocks' files. What the marker claims is tested:
  if a later block needs an earlier section's output, it fails. (It also lets a parallel run, `-n`,
  put the document's parts on different workers.)
A fenced block in another language must name it (```toml, ```text); a block without a language
tag, a marker that is not understood, or a command in an indented (unfenced) code block fails
`test_every_block_is_run_or_marked`.

Run one document or section: `python -m pytest tests/test_docs.py -k README` (or `-k export`); a
block first runs the blocks of its document before it that have not run yet (its session's state),
so a selection still runs as the document reads.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from docdata import make_doc_data

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py"}
DATA = {"toml", "text", "json", "yaml", "ini", "cfg", "diff", "markdown", "md"}  # shown, not run
BLOCK_TIMEOUT = int(os.environ.get("ZOO_DOCS_BLOCK_TIMEOUT", "900"))

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>[\w-]+)\s*:\s*(?P<body>.*?)\s*-->\s*$")
EXPECT_FIELD = re.compile(r'(?P<key>\w+)=(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<bare>\S+))')
INDENTED_COMMAND = re.compile(r"^(?: {4,}|\t)(?:\$ )?(?:zoo|python|pip|torchrun)\b")


# --------------------------------------------------------------------------- extraction
@dataclass
class Block:
    doc: str            # README.md, docs/plugins.md
    line: int           # 1-based line of the opening fence
    lang: str
    text: str
    section: str        # the heading it sits under
    markers: dict = field(default_factory=dict)  # kind -> body
    index: int = 0      # position among the document's blocks
    part: int = 0       # which `<!-- session: fresh -->` part of the document it runs in (0: the first)

    @property
    def session_key(self) -> str:
        return self.doc if not self.part else f"{self.doc}#{self.part}"

    @property
    def kind(self) -> str:
        if self.lang in SHELL:
            return "shell"
        if self.lang in PYTHON:
            return "python"
        return "data"

    @property
    def runnable(self) -> bool:
        return self.kind in ("shell", "python") and "not-run" not in self.markers

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-") or "top"
        return f"{self.doc}:{self.line}:{slug}"

    def expectation(self) -> dict:
        body = self.markers.get("expect")
        if body is None:
            return {}
        out = {}
        for m in EXPECT_FIELD.finditer(body):
            value = m.group("quoted")
            out[m.group("key")] = (value.replace('\\"', '"') if value is not None else m.group("bare"))
        return out


def commands(text: str) -> list[str]:
    """The shell commands of a block: one per line, backslash continuations joined, comments and
    blank lines dropped (what a user would paste line by line)."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    if pending.strip():
        out.append(pending.strip())
    return out


def extract(path: Path) -> tuple[list[Block], list[str]]:
    """Every fenced code block of a Markdown file, with the markers just above it; and the
    problems found on the way (unterminated fences, untagged blocks, unknown markers, commands
    in indented code blocks)."""
    doc = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    section = ""
    i = 0
    in_list_or_para = False
    while i < len(lines):
        line = lines[i]
        m = FENCE.match(line)
        if m:
            fence, lang = m.group("fence"), m.group("lang").lower()
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i].removeprefix(m.group("indent")))
                i += 1
            if i >= len(lines):
                problems.append(f"{doc}:{start + 1}: the code block opened here is never closed")
            markers: dict = {}
            j = start - 1
            while j >= 0 and MARKER.match(lines[j]):
                mk = MARKER.match(lines[j])
                markers[mk.group("kind")] = mk.group("body")
                j -= 1
            part = (blocks[-1].part if blocks else 0) + ("session" in markers)
            blocks.append(Block(doc, start + 1, lang, "\n".join(body) + "\n", section, markers, len(blocks), part))
            i += 1
            in_list_or_para = False
            continue
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        elif INDENTED_COMMAND.match(line) and not in_list_or_para:
            problems.append(f"{doc}:{i + 1}: a command in an indented code block ({line.strip()!r}): fence it "
                            "as ```bash so the docs suite runs it, or mark it <!-- not-run: REASON -->")
        in_list_or_para = bool(line.strip()) and not INDENTED_COMMAND.match(line)
        i += 1
    for b in blocks:
        where = f"{b.doc}:{b.line}"
        for kind, body in b.markers.items():
            if kind not in ("not-run", "expect", "session"):
                problems.append(f"{where}: unknown marker <!-- {kind}: ... --> (known: not-run, expect, session)")
            elif kind == "session" and body != "fresh":
                problems.append(f"{where}: <!-- session: {body} --> (the one form: <!-- session: fresh -->)")
            elif kind == "not-run" and not body:
                problems.append(f"{where}: <!-- not-run: --> needs a reason")
        if not b.lang:
            problems.append(f"{where}: a code block without a language: tag it ```bash or ```python to run it, "
                            f"or ```text/```toml for what is only shown")
        elif b.kind == "data" and b.lang not in DATA:
            problems.append(f"{where}: unknown code block language {b.lang!r} (run: {sorted(SHELL | PYTHON)}; "
                            f"shown only: {sorted(DATA)})")
        if b.kind == "data" and b.markers:
            problems.append(f"{where}: a ```{b.lang} block is never run; its markers mean nothing")
        if "expect" in b.markers:
            exp = b.expectation()
            unknown = set(exp) - {"exit", "stderr", "stdout"}
            if unknown or not exp:
                problems.append(f"{where}: <!-- expect: {b.markers['expect']} --> (fields: exit=N stderr=\"...\" "
                                "stdout=\"...\")")
            if "exit" in exp and b.kind == "shell" and len(commands(b.text)) != 1:
                problems.append(f"{where}: a block documented to fail must hold exactly one command "
                                f"(found {len(commands(b.text))})")
            if "not-run" in b.markers:
                problems.append(f"{where}: both not-run and expect")
    return blocks, problems


ALL = {p.relative_to(ROOT).as_posix(): extract(p) for p in DOCS}
RUNNABLE = [b for blocks, _ in ALL.values() for b in blocks if b.runnable]


def test_every_block_is_run_or_marked():
    """The extraction itself: every document is read, every code block is run, shown as data, or
    marked not-run with a reason; markers are understood; no command hides in an indented block."""
    assert "README.md" in ALL and any(d.startswith("docs/") for d in ALL), sorted(ALL)
    problems = [p for _, probs in ALL.values() for p in probs]
    assert not problems, "\n".join(problems)
    readme = ALL["README.md"][0]
    assert sum(b.runnable for b in readme) >= 5, "the README's blocks were not found"
    # the extraction sees what a reader sees: the main job is among the commands run
    assert any(c.split("#")[0].strip() == "zoo train"
               for b in readme if b.runnable and b.kind == "shell" for c in commands(b.text)), \
        "README's main job (`zoo train`) is not among the commands the suite runs"


def test_extraction_negative_controls(tmp_path, monkeypatch):
    """The extraction check can fail: an untagged block, an unknown marker, an indented command and
    a not-run without a reason are each reported."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    md = tmp_path / "x.md"
    md.write_text("# T\n\n```\nzoo list\n```\n\n<!-- skip: because -->\n```bash\nzoo list\n```\n\n"
                  "Text.\n\n    zoo bench x\n\n<!-- not-run: -->\n```python\nprint(1)\n```\n\n"
                  "<!-- expect: exit=2 -->\n```bash\nzoo a\nzoo b\n```\n", encoding="utf-8")
    blocks, problems = extract(md)
    text = "\n".join(problems)
    assert len(blocks) == 4
    assert "without a language" in text and "unknown marker" in text and "indented code block" in text
    assert "needs a reason" in text and "exactly one command" in text
    assert [b.runnable for b in blocks] == [False, True, False, True]
    assert commands("zoo a \\\n  --b c   # why\n# only a comment\n\nzoo d\n") == ["zoo a    --b c   # why", "zoo d"]


def test_a_session_marker_starts_a_new_part(tmp_path, monkeypatch):
    """`<!-- session: fresh -->` starts a part with its own session; only that one form is accepted."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    md = tmp_path / "x.md"
    md.write_text("# A\n\n```bash\nzoo list\n```\n\n```bash\nzoo info x\n```\n\n# B\n\n<!-- session: fresh -->\n"
                  "```bash\nzoo list\n```\n\n```python\nprint(1)\n```\n\n<!-- session: new -->\n```bash\nzoo list\n```\n",
                  encoding="utf-8")
    blocks, problems = extract(md)
    assert [b.part for b in blocks] == [0, 0, 1, 1, 2]
    assert [b.session_key for b in blocks[1:3]] == ["x.md", "x.md#1"]
    assert problems == ["x.md:23: <!-- session: new --> (the one form: <!-- session: fresh -->)"]


# --------------------------------------------------------------------------- sessions
class Session:
    """One document's terminal: its working directory, environment, and which blocks have run."""

    def __init__(self, doc: str, base: Path, cache: Path, torch_home: Path):
        self.doc = doc
        self.cwd = base / re.sub(r"[^\w.-]+", "_", doc)
        self.cwd.mkdir(parents=True)
        self.snippets = base / f"{self.cwd.name}-snippets"
        self.snippets.mkdir()
        make_doc_data(self.cwd)
        bin_dir = str(Path(sys.executable).parent)
        self.env = dict(os.environ, ZOO_CACHE_DIR=str(cache), TORCH_HOME=str(torch_home), HF_HUB_OFFLINE="1",
                        PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), PYTHONUNBUFFERED="1",
                        MPLBACKEND="Agg", COLUMNS="120")
        self.env.pop("ZOO_STRICT_PLUGINS", None)
        self.done: dict[int, str | None] = {}  # block index -> None (passed) or the failure

    def run(self, block: Block) -> subprocess.CompletedProcess:
        if block.kind == "python":
            script = self.snippets / f"block_{block.line}.py"
            script.write_text(block.text, encoding="utf-8")
            argv = [sys.executable, str(script)]
        else:
            lines = ["set -e -o pipefail"]
            for cmd in commands(block.text):
                lines.append(f"printf '%s\\n' {shlex.quote('$ ' + cmd)} >&2")
                lines.append(cmd)
            argv = ["bash", "-c", "\n".join(lines)]
        # its own process group, so that a block past its time is stopped with everything it started
        # (a `zoo bench` child, torchrun's workers), not only the shell
        proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return subprocess.CompletedProcess(argv, 124, out or "", (err or "") +
                                               f"\n[docs suite: timed out after {BLOCK_TIMEOUT} s]")
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def check(self, block: Block) -> str | None:
        """Run a block and judge it against its expectation: None when it behaves as documented."""
        proc = self.run(block)
        exp = block.expectation()
        want_rc = int(exp.get("exit", 0))
        problems = []
        if proc.returncode != want_rc:
            problems.append(f"exit code {proc.returncode}, documented {want_rc}")
        for stream in ("stdout", "stderr"):
            if stream in exp and exp[stream] not in getattr(proc, stream):
                problems.append(f"{stream} lacks the documented {exp[stream]!r}")
        if want_rc and not proc.stderr.strip():
            problems.append("a documented failure must say why on stderr")
        if not problems:
            return None
        def tail(text: str) -> str:
            return text[-4000:]

        return (f"{block.doc}:{block.line} ({block.section}) as written:\n{block.text}\n"
                f"{'; '.join(problems)}\n--- stdout ---\n{tail(proc.stdout)}\n--- stderr ---\n{tail(proc.stderr)}")

    def upto(self, block: Block, blocks: list[Block]) -> None:
        """Run every earlier runnable block of this document not yet run (a `-k` selection still
        sees the state the document builds up), then this one."""
        for b in blocks:
            if b.index > block.index:
                break
            if not b.runnable or b.index in self.done:
                continue
            try:
                self.done[b.index] = self.check(b)
            except Exception as exc:  # noqa: BLE001 - a failure of the suite itself: recorded, not rerun
                self.done[b.index] = f"{b.doc}:{b.line}: the docs suite failed running it: {type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    src = SHARED / "weights" / MOBILENET_FILE
    if not src.is_file():
        pytest.skip(f"{src} is absent: the docs use torchvision/mobilenet_v2's pretrained weights offline")
    base = tmp_path_factory.mktemp("docs")
    torch_home = base / "torch-home"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    try:
        (torch_home / "hub" / "checkpoints" / MOBILENET_FILE).symlink_to(src)
    except OSError:
        shutil.copy(src, torch_home / "hub" / "checkpoints" / MOBILENET_FILE)
    made: dict[str, Session] = {}

    def get(key: str) -> Session:
        if key not in made:
            made[key] = Session(key, base, base / f"cache-{len(made)}", torch_home)
        return made[key]

    return get


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a `-k` selection runs the document's earlier blocks first; each has BLOCK_TIMEOUT
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_doc_block(block: Block, sessions):
    session = sessions(block.session_key)
    blocks = [b for b in ALL[block.doc][0] if b.part == block.part]
    session.upto(block, blocks)
    earlier = [b for b in blocks if b.index < block.index and session.done.get(b.index)]
    if session.done[block.index] is not None:
        note = (f"\n(earlier blocks of {block.doc} failed too: {', '.join(str(b.line) for b in earlier)})"
                if earlier else "")
        pytest.fail(session.done[block.index] + note, pytrace=False)


def test_a_parallel_run_keeps_each_part_of_a_document_together():
    """Each block runs after the earlier blocks of its session, so a parallel run must send a part of
    a document (its `<!-- session: fresh -->` sections) to one worker whole (tests/xdist_groups.py);
    different parts and documents are different work units, other tests are grouped by module."""
    from xdist_groups import group_of

    groups = {b.id: group_of(f"tests/test_docs.py::test_doc_block[{b.id}]") for b in RUNNABLE}
    assert all(groups[b.id] == f"doc:{b.session_key}" for b in RUNNABLE)
    readme = {groups[b.id] for b in RUNNABLE if b.doc == "README.md"}
    assert readme == {"doc:README.md", "doc:README.md#1"}  # README's one session marker: two parts
    assert group_of("tests/test_cache.py::test_index[a-b]") == "tests/test_cache.py"
    assert group_of("tests/test_docs.py::test_every_block_is_run_or_marked") == "tests/test_docs.py"
