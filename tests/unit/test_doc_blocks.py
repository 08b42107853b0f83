"""The cheap half of "every code block in the docs is executed": classification, JSON, ini, Python.

Shell blocks and DAG runs need Airflow's CLI and the fake server: tests/e2e/test_doc_blocks.py.
The rules are in tests/doc_blocks.py.
"""

from __future__ import annotations

import configparser
import json
from collections import defaultdict

import pytest

from airflow_llm_async import get_provider_info
from airflow_llm_async.core import pricing
from tests.doc_blocks import (
    ROOT,
    Block,
    DocBlockError,
    all_blocks,
    classify,
    console_parts,
    dags_run_by_shell,
    kind_or_none,
    parse_blocks,
    serve_locally,
    with_help,
)

BLOCKS = all_blocks()


def by_kind(*kinds: str) -> list[Block]:
    return [block for block in BLOCKS if kind_or_none(block) in kinds]


def ids(blocks: list[Block]) -> list[str]:
    return [block.where for block in blocks]


def test_every_doc_block_is_found_and_classified():
    assert len(BLOCKS) > 30
    assert {"README.md", "docs/getting-started.md", "docs/connections.md"} <= {b.path for b in BLOCKS}
    errors = []
    for block in BLOCKS:
        try:
            classify(block)
        except DocBlockError as exc:
            errors.append(str(exc))
    assert errors == [], "\n".join(errors)


def test_blocks_that_cannot_run_as_written_stay_few_and_say_why():
    exceptions = [f"{b.where} {b.directive}: {b.reason}" for b in BLOCKS if b.directive]
    runnable = [b for b in BLOCKS if b.directive is None and b.lang != "text"]
    assert all(b.reason and len(b.reason) > 15 for b in BLOCKS if b.directive), exceptions
    assert len(exceptions) < len(runnable) / 2, exceptions


def test_the_classifier_refuses_what_it_cannot_run(tmp_path):
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text(
        "intro\n\n```yaml\na: 1\n```\n\n```json\n{}\n```\n\n```\nbare\n```\n\n"
        "<!-- doc-test: help -->\n```bash\nairflow version\n```\n\n"
        "<!-- doc-test: parse-only: not a DAG -->\n```bash\nls\n```\n\n"
        "```console\nno prompt here\n```\n"
    )
    messages = []
    for block in parse_blocks(doc, tmp_path):
        with pytest.raises(DocBlockError) as caught:
            classify(block)
        messages.append(str(caught.value))
    assert [m.split(":")[:2] for m in messages] == [
        ["docs/x.md", "3"],
        ["docs/x.md", "7"],
        ["docs/x.md", "11"],
        ["docs/x.md", "16"],
        ["docs/x.md", "21"],
        ["docs/x.md", "25"],
    ]
    assert "yaml" in messages[0] and "llm-extra" in messages[1] and "needs a reason" in messages[3]
    assert "does not apply to a shell block" in messages[4]
    doc.write_text("```python\nprint(1)\n")
    with pytest.raises(DocBlockError, match=r"docs/x.md:1: this code block is never closed"):
        parse_blocks(doc, tmp_path)


@pytest.mark.parametrize("block", by_kind("json"), ids=ids(by_kind("json")))
def test_json_block_is_what_it_says(block):
    from airflow.sdk import Connection

    from airflow_llm_async.hooks.llm import endpoint_from_connection

    try:
        value = json.loads(block.text)
    except ValueError as exc:
        pytest.fail(f"{block.where}: not valid JSON: {exc}")
    what = block.words[0]
    if what == "llm-connection":
        # The JSON form of AIRFLOW_CONN_<ID>, read the way Airflow reads that variable.
        conn = Connection.from_json(block.text, conn_id="doc_block")
        assert conn.conn_type == "llm", f"{block.where}: conn_type must be 'llm'"
        endpoint = endpoint_from_connection(conn)
        assert endpoint.chat_url.startswith(("http://", "https://")), block.where
    elif what == "llm-extra":
        assert isinstance(value, dict), f"{block.where}: an extra is a JSON object"
        conn = Connection(conn_id="doc_block", conn_type="llm", password="sk-doc", extra=block.text)
        endpoint_from_connection(conn)
    elif what == "llm-prices":
        assert pricing.parse_prices(value, block.where), f"{block.where}: an empty price table"


@pytest.mark.parametrize("block", by_kind("ini"), ids=ids(by_kind("ini")))
def test_ini_block_sets_only_options_that_exist(block):
    from airflow.configuration import conf

    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(block.text)
    except configparser.Error as exc:
        pytest.fail(f"{block.where}: not valid ini: {exc}")
    ours = get_provider_info()["config"]
    # has_option misses Airflow's options without a default (e.g. [logging] namespace_levels).
    airflows = conf.configuration_description
    unknown = [
        f"[{section}] {option}"
        for section in parser.sections()
        for option in parser[section]
        if not (
            option in ours.get(section, {}).get("options", {})
            or option in airflows.get(section, {}).get("options", {})
            or conf.has_option(section, option)
        )
    ]
    assert parser.sections() and unknown == [], f"{block.where}: unknown options {unknown}"


@pytest.mark.parametrize("block", by_kind("dag", "snippet"), ids=ids(by_kind("dag", "snippet")))
def test_python_block_compiles(block):
    try:
        compile(block.text, block.where, "exec")
    except SyntaxError as exc:
        pytest.fail(f"{block.path}:{block.line + (exc.lineno or 0)}: {exc.msg}")


def _snippets_by_doc() -> dict[str, list[Block]]:
    docs: dict[str, list[Block]] = defaultdict(list)
    for block in by_kind("snippet"):
        if block.directive is None:
            docs[block.path].append(block)
    return docs


@pytest.mark.parametrize("doc", sorted(_snippets_by_doc()))
def test_python_snippets_run_in_order(doc):
    namespace: dict = {"__name__": "doc_snippets"}
    for block in _snippets_by_doc()[doc]:
        try:
            exec(compile(block.text, block.where, "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"{block.where}: {type(exc).__name__}: {exc}")


def test_dag_blocks_parse_with_no_import_error(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    blocks = by_kind("dag")
    assert len(blocks) >= 5
    files = {}
    for block in blocks:
        path = tmp_path / block.path.replace("/", "_").replace(".md", "") / block.dag_file_name
        path.parent.mkdir(exist_ok=True)
        assert not path.exists(), f"{block.where}: two DAG blocks of one doc share the file {path.name}"
        path.write_text(block.text)
        files[str(path)] = block
    bag = DagBag(dag_folder=str(tmp_path), safe_mode=False)
    errors = [
        f"{files[path].where}: {error.strip().splitlines()[-1]}" for path, error in bag.import_errors.items()
    ]
    assert errors == [], "\n".join(errors)
    without_dag = [
        block.where for path, block in files.items() if not any(d.fileloc == path for d in bag.dags.values())
    ]
    assert without_dag == []


def test_the_docs_index_links_every_doc():
    index = (ROOT / "docs/README.md").read_text()
    docs = [path.name for path in sorted((ROOT / "docs").glob("*.md")) if path.name != "README.md"]
    missing = [name for name in docs if f"({name})" not in index]
    assert missing == []
    assert "(docs/README.md)" in (ROOT / "README.md").read_text()


def test_local_server_addresses_point_at_the_fake_server_and_commands_get_help():
    text = "curl http://localhost:11434/v1 http://127.0.0.1:8089/v1 http://localhost:9999/v1 https://api.openai.com/v1"
    assert serve_locally(text, "http://127.0.0.1:40123/v1") == (
        "curl http://127.0.0.1:40123/v1 http://127.0.0.1:40123/v1 http://localhost:9999/v1 https://api.openai.com/v1"
    )
    block = (
        "# setup\n.venv/bin/python bench/x.py --sizes 1 2   # ~4 min\n\npip install \\\n    -e '.[bench]'\n"
    )
    assert (
        with_help(block)
        == ".venv/bin/python bench/x.py --sizes 1 2 --help\npip install -e '.[bench]' --help\n"
    )
    script, expected = console_parts("$ export A=1\n$ echo $A\n1\n\n  two  \n")
    assert (script, expected) == ("export A=1\necho $A\n", ["1", "two"])


def test_dags_a_doc_runs_itself_are_not_run_twice(tmp_path):
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text(
        "```console\n$ airflow dags test hello_llm 2>&1 | grep x\nx\n```\n\n"
        "<!-- doc-test: help: a long run of another DAG, only its options are checked -->\n"
        "```bash\nairflow dags test other\n```\n"
    )
    assert dags_run_by_shell(parse_blocks(doc, tmp_path)) == {"hello_llm"}
