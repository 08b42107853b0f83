"""The other half of "every code block in the docs is executed": shell commands and DAG runs.

One test per doc, its blocks in order, in a fresh HOME whose ``~/airflow`` holds a migrated SQLite
DB, against one fake LLM server; DAG blocks are run with ``dag.test()`` (triggers run inline) unless
the doc runs them itself with ``airflow dags test``. The rules are in tests/doc_blocks.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_llm_async.testing.fake_server_process import FakeServerProcess
from tests.doc_blocks import (
    ROOT,
    Block,
    all_blocks,
    classify,
    console_parts,
    dags_run_by_shell,
    kind_or_none,
    serve_locally,
    with_help,
)

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
LOCAL_MODELS = ("Qwen/Qwen2.5-7B-Instruct", "llama3.2")
RUN_KINDS = ("shell", "console", "dag")
DOCS = sorted({block.path for block in all_blocks() if kind_or_none(block) in RUN_KINDS})
# The docs that install into "an existing Airflow" share one such virtualenv: one xdist worker runs them.
FRESH_AIRFLOW_DOCS = {block.path for block in all_blocks() if block.directive == "fresh-airflow"}

# dag.test() for each DAG file given; prints one RESULT line per DAG.
_DAG_RUNNER = """
import sys
from airflow.dag_processing.dagbag import DagBag

folder, run_by_doc, files = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
bag = DagBag(folder, safe_mode=False)
for path, error in bag.import_errors.items():
    print(f"IMPORT-ERROR {path} {error!r}")
for path in files:
    for dag in [d for d in bag.dags.values() if d.fileloc == path]:
        if dag.dag_id in run_by_doc:  # the doc runs it with `airflow dags test`
            print(f"RESULT {path} {dag.dag_id} run-by-doc", flush=True)
            continue
        run = dag.test()
        print(f"RESULT {path} {dag.dag_id} {run.state}", flush=True)
"""


@pytest.fixture(scope="module")
def doc_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("doc-llm") / "fake-llm.log"
    # The model names the docs use for vLLM and Ollama are served too.
    with FakeServerProcess(latency=0.1, models=LOCAL_MODELS, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def migrated_db(sqlite_template):
    """The run's migrated SQLite template (tests/e2e/conftest.py), copied into each doc's HOME."""
    return sqlite_template


@pytest.fixture(scope="module")
def fresh_airflow(tmp_path_factory):
    """A new virtualenv with only Apache Airflow (our constraints), and a copy of the checkout."""
    base = tmp_path_factory.mktemp("fresh-airflow")
    venv, checkout = base / "venv", base / "airflow-llm-async"
    uv = str(VENV_BIN / "uv")
    airflow_pin = next(
        line.strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.startswith("apache-airflow==")
    )
    subprocess.run([uv, "venv", "-q", "--seed", "-p", sys.executable, str(venv)], check=True, timeout=120)
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(venv / "bin/python"), "-c", "constraints.txt"]
        + [airflow_pin],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    return venv / "bin", checkout


def block_env(home: Path, base_url: str, bin_dir: Path = VENV_BIN) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW", "OPENAI_")) and key != "VIRTUAL_ENV"
    }
    real_home = Path(os.environ.get("HOME", "/root"))
    # The blocks get a fresh HOME, but pip and uv keep the caches they had: same results, no downloads.
    env.setdefault("PIP_CACHE_DIR", str(real_home / ".cache" / "pip"))
    env.setdefault("UV_CACHE_DIR", str(real_home / ".cache" / "uv"))
    env.update(
        HOME=str(home),
        PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        OPENAI_API_KEY="sk-doc-test-not-a-key",
        OPENAI_BASE_URL=base_url,
    )
    return env


def run_script(script: str, *, env: dict, cwd: Path, where: str, timeout: float = 300) -> str:
    """Run a block with bash; a failure names the block and shows the ends of its output."""
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a timeout kills everything the block started
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{where}: still running after {timeout} s\n{script}\n{out[-2000:]}\n{err[-2000:]}")
    if proc.returncode != 0:
        pytest.fail(
            f"{where}: exit {proc.returncode}\n--- script\n{script}\n--- stdout (end)\n{out[-3000:]}"
            f"\n--- stderr (end)\n{err[-3000:]}"
        )
    return out


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(
            doc, marks=[pytest.mark.xdist_group("fresh-airflow")] if doc in FRESH_AIRFLOW_DOCS else []
        )
        for doc in DOCS
    ],
)
def test_doc_blocks_run(doc, tmp_path, doc_server, migrated_db, request):
    blocks = [block for block in all_blocks() if block.path == doc]
    for block in blocks:
        classify(block)  # a block that cannot be classified fails the doc, with its line
    base_url = doc_server.base_url
    home = tmp_path / "home"
    airflow_home = home / "airflow"
    (airflow_home / "dags").mkdir(parents=True)
    shutil.copy(migrated_db, airflow_home / "airflow.db")

    dag_files: dict[str, Block] = {}
    for block in blocks:
        if block.kind == "dag":
            path = airflow_home / "dags" / block.dag_file_name
            path.write_text(serve_locally(block.text, base_url))
            if block.directive is None:
                dag_files[str(path)] = block

    for block in blocks:
        env, cwd = block_env(home, base_url), ROOT
        if block.kind == "shell":
            script = serve_locally(block.text, base_url)
            if block.directive == "help":
                script = with_help(script)
            elif block.directive == "fresh-airflow":
                bin_dir, cwd = request.getfixturevalue("fresh_airflow")
                env = block_env(home, base_url, bin_dir)
            run_script(script, env=env, cwd=cwd, where=block.where)
        elif block.kind == "console":
            script, expected = console_parts(serve_locally(block.text, base_url))
            out = run_script(script, env=env, cwd=cwd, where=block.where)
            missing = [line for line in expected if line not in out]
            assert missing == [], f"{block.where}: output lines not printed: {missing}\n--- printed\n{out}"

    if not dag_files:
        return
    out = run_script(
        f"python -c {shlex.quote(_DAG_RUNNER)} {airflow_home / 'dags'} "
        f"{shlex.quote(','.join(sorted(dags_run_by_shell(blocks))) or '-')} "
        + " ".join(shlex.quote(path) for path in dag_files),
        env=block_env(home, base_url),
        cwd=ROOT,
        where=f"{doc}: dag.test() of {[b.where for b in dag_files.values()]}",
        timeout=600,
    )
    assert "IMPORT-ERROR" not in out, out
    results: dict[str, list[tuple[str, str]]] = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            _, path, dag_id, state = line.split()
            results.setdefault(path, []).append((dag_id, state))
    for path, block in dag_files.items():
        assert results.get(path), f"{block.where}: dag.test() found no DAG in this block\n{out[-3000:]}"
        failed = [(d, state) for d, state in results[path] if state not in ("success", "run-by-doc")]
        assert failed == [], f"{block.where}: DAG run(s) did not succeed: {failed}\n{out[-5000:]}"
