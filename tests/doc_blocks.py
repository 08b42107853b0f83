"""Every fenced code block of README.md and docs/**/*.md, and what the doc tests do with it.

The first word of a block's info string says what it is; the tests find every block, so a block
added later is covered too, and a block they cannot classify fails with its file and line.

* ``python``: a block that defines a DAG (``DAG(`` or ``@dag``) is a DAG file. It is written to
  ``~/airflow/dags`` (the name in a first-line comment such as ``# ~/airflow/dags/hello_llm.py``,
  else ``<doc>_<line>.py``) and must parse with no import error (unit test); then it is run with
  ``dag.test()`` against the fake LLM server (e2e test), unless a ``bash`` block of the same doc
  runs it with ``airflow dags test <dag_id>``. Any other block is a snippet: the snippets of one
  doc are exec'd in order in one namespace, like a notebook.
* ``bash`` / ``sh`` / ``shell``: run by bash (``-euo pipefail``) from the checkout, the .venv on
  PATH, in a fresh HOME whose ``~/airflow`` holds a migrated SQLite DB (so ``~/airflow`` is the
  default AIRFLOW_HOME). The blocks of one doc run in order in the same HOME.
* ``console``: lines starting with ``$ `` are commands, run as above; the other lines are output,
  and each must appear in what the commands printed.
* ``json``: parsed; the second word says what it is and the test checks it: ``llm-connection`` (a
  connection in the JSON form of ``AIRFLOW_CONN_...``, resolved by LLMHook), ``llm-extra`` (a
  connection extra, accepted by LLMHook), ``llm-prices`` (a price table, accepted by
  ``pricing.parse_prices``) or ``output`` (an example output: parsed only).
* ``ini`` / ``cfg``: parsed; every option must be one Airflow or this provider defines.
* ``text``: output or a diagram, not code: not run.

The fake server is reached at whatever loopback address a doc uses for a local server
(``127.0.0.1:8089``, ``localhost:8000`` for vLLM, ``localhost:11434`` for Ollama, ``localhost:4000``
for LiteLLM): the test replaces those by the address of the fake server it started.
``OPENAI_API_KEY`` is a dummy and ``OPENAI_BASE_URL`` points at that server.

A block that cannot run as written says so in an HTML comment on the line above it, with the
reason; the tests then do the stated lesser check (keep this list short):

* ``<!-- doc-test: help: REASON -->`` (shell): each command is run with ``--help`` appended
  (for a long run such as a benchmark or a server that runs until stopped);
* ``<!-- doc-test: fresh-airflow: REASON -->`` (shell): run in a new virtualenv that holds only
  Apache Airflow (pinned by constraints.txt), from a copy of the checkout: "an existing Airflow";
* ``<!-- doc-test: parse-only: REASON -->`` (a python DAG): parsed, not run;
* ``<!-- doc-test: compile-only: REASON -->`` (python): compiled, not run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHELL_LANGS = ("bash", "sh", "shell")
DIRECTIVES = {
    "help": ("shell",),
    "fresh-airflow": ("shell",),
    "parse-only": ("dag",),
    "compile-only": ("dag", "snippet"),
}
JSON_KINDS = ("llm-connection", "llm-extra", "llm-prices", "output")
# Local servers a doc may name; the test serves them all with the fake LLM server.
LOCAL_SERVER = re.compile(r"\b(?:localhost|127\.0\.0\.1):(?:8089|8000|11434|4000)\b")

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<action>[\w-]+)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$")
_DEFINES_DAG = re.compile(r"\bDAG\(|^\s*@dag\b", re.MULTILINE)
_DAG_FILE_COMMENT = re.compile(r"^#\s*(?:~/airflow/)?dags/(?P<name>\w+\.py)\s*$")
_DAGS_TEST = re.compile(r"\bairflow dags test\s+(?P<dag_id>[\w.-]+)")


class DocBlockError(ValueError):
    """A block the doc tests cannot classify; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Block:
    path: str  # relative to the checkout
    line: int  # the opening fence's line, from 1
    info: str
    text: str
    directive: str | None = None
    reason: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def lang(self) -> str:
        return self.info.split()[0].lower() if self.info.split() else ""

    @property
    def words(self) -> list[str]:
        return self.info.split()[1:]

    @property
    def kind(self) -> str:
        """What the tests do with the block; raises DocBlockError when that is unclear."""
        return classify(self)

    @property
    def dag_file_name(self) -> str:
        first = self.text.splitlines()[0] if self.text.strip() else ""
        match = _DAG_FILE_COMMENT.match(first)
        if match:
            return match["name"]
        return f"{Path(self.path).stem.replace('-', '_').lower()}_{self.line}.py"


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def parse_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The fenced blocks of one Markdown file, with the directive comment right above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = str(path.relative_to(root))
    blocks = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent, start = match["fence"], len(match["indent"]), i
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        i += 1
        body = []
        while i < len(lines) and not close.match(lines[i]):
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        if i == len(lines):
            raise DocBlockError(f"{rel}:{start + 1}: this code block is never closed.")
        i += 1
        directive = reason = None
        above = start - 1
        if above >= 0:
            found = _DIRECTIVE.match(lines[above])
            if found:
                directive, reason = found["action"], found["reason"]
        blocks.append(Block(rel, start + 1, match["info"].strip(), "\n".join(body) + "\n", directive, reason))
    return blocks


def all_blocks(root: Path = ROOT) -> list[Block]:
    return [block for path in doc_files(root) for block in parse_blocks(path, root)]


def classify(block: Block) -> str:
    """One of: dag, snippet, shell, console, json, ini, text (directives narrow what is run)."""
    lang = block.lang
    if lang == "python":
        kind = "dag" if _DEFINES_DAG.search(block.text) else "snippet"
    elif lang in SHELL_LANGS:
        kind = "shell"
    elif lang == "console":
        kind = "console"
        if not any(line.startswith("$ ") for line in block.text.splitlines()):
            raise DocBlockError(f"{block.where}: a console block needs at least one `$ command` line.")
    elif lang == "json":
        kind = "json"
        if len(block.words) != 1 or block.words[0] not in JSON_KINDS:
            raise DocBlockError(
                f"{block.where}: say what this JSON is after the language, one of {list(JSON_KINDS)}, "
                f"e.g. ```json llm-extra"
            )
    elif lang in ("ini", "cfg"):
        kind = "ini"
    elif lang == "text":
        kind = "text"
    else:
        raise DocBlockError(
            f"{block.where}: the doc tests cannot classify a code block with info string {block.info!r}: "
            f"use python, bash, console, json, ini or text (see tests/doc_blocks.py)."
        )
    if block.directive is not None:
        allowed = DIRECTIVES.get(block.directive)
        if allowed is None:
            raise DocBlockError(
                f"{block.where}: unknown doc-test directive {block.directive!r}; known: {sorted(DIRECTIVES)}."
            )
        if kind not in allowed:
            raise DocBlockError(
                f"{block.where}: doc-test {block.directive!r} does not apply to a {kind} block."
            )
        if not block.reason:
            raise DocBlockError(
                f"{block.where}: doc-test {block.directive!r} needs a reason: "
                f"<!-- doc-test: {block.directive}: why this block cannot run as written -->"
            )
    return kind


def kind_or_none(block: Block) -> str | None:
    """The block's kind, or None when it cannot be classified (the unit test reports why)."""
    try:
        return classify(block)
    except DocBlockError:
        return None


def serve_locally(text: str, base_url: str) -> str:
    """Point every local-server address of a block at the fake server at ``base_url``."""
    host_port = base_url.split("://", 1)[1].split("/", 1)[0]
    return LOCAL_SERVER.sub(host_port, text)


def shell_commands(text: str) -> list[str]:
    """A shell block's commands as written: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        command = re.sub(r"(^|\s+)#.*$", "", line).strip()  # a trailing comment (a `#` after a space)
        if command:
            commands.append(command)
    return commands


def with_help(text: str) -> str:
    """The ``help`` directive: each command, with ``--help`` appended."""
    return "\n".join(f"{command} --help" for command in shell_commands(text)) + "\n"


def console_parts(text: str) -> tuple[str, list[str]]:
    """A console block's commands (as a script) and its expected output lines."""
    commands, expected = [], []
    for line in text.splitlines():
        if line.startswith("$ "):
            commands.append(line[2:])
        elif line.strip():
            expected.append(line.strip())
    return "\n".join(commands) + "\n", expected


def dags_run_by_shell(blocks: list[Block]) -> set[str]:
    """DAG ids that a shell or console block of the same doc runs with ``airflow dags test``."""
    return {
        match["dag_id"]
        for block in blocks
        if block.lang in (*SHELL_LANGS, "console") and block.directive is None
        for match in _DAGS_TEST.finditer(block.text)
    }
