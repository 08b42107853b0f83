"""An Airflow DAG: the article's pipeline (example_dags/llm_content_pipeline.py, unchanged) with the cache on:
its source is run here with another DAG id and two more default_args, so both DAGs stay the same
pipeline. Its calls go through connection llm_cache (answers kept in the test Redis, shared by both
triggerers); tests/e2e/test_example_dags.py runs it twice: the second run sends nothing.
"""

from __future__ import annotations

from pathlib import Path

DAG_ID = "e2e_pipeline_cached"
CACHE_TTL = 600

# Beside this file in a deployment's DAG folder; in the checkout, in example_dags/.
_pipeline = Path(__file__).resolve().parent / "llm_content_pipeline.py"
if not _pipeline.exists():
    _pipeline = Path(__file__).resolve().parents[3] / "example_dags" / "llm_content_pipeline.py"
_source = _pipeline.read_text(encoding="utf-8")
_source = _source.replace('"llm_content_pipeline"', repr(DAG_ID), 1).replace(
    '"on_failure_callback": alert_on_failure,',
    f'"on_failure_callback": alert_on_failure, "llm_conn_id": "llm_cache", "cache_ttl": {CACHE_TTL},',
    1,
)
assert repr(DAG_ID) in _source and '"cache_ttl"' in _source, "the example pipeline changed: update this file"
exec(compile(_source, str(_pipeline), "exec"))  # its own file name: serialization reads task sources from it
