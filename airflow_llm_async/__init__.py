"""airflow-llm-async: LLM chat completions that wait in the Airflow triggerer, not on worker slots."""

from __future__ import annotations

__version__ = "0.6.0"


def get_provider_info() -> dict:
    """Describe the provider to Airflow's ProvidersManager (the ``apache_airflow_provider`` entry point)."""
    return {
        "package-name": "airflow-llm-async",
        "name": "LLM Async",
        "description": "Deferrable LLM chat-completion operators whose calls run in the Airflow triggerer.",
        "versions": [__version__],
        "connection-types": [
            {"connection-type": "llm", "hook-class-name": "airflow_llm_async.hooks.llm.LLMHook"},
        ],
        "hooks": [
            {"integration-name": "LLM", "python-modules": ["airflow_llm_async.hooks.llm"]},
        ],
        "triggers": [
            {
                "integration-name": "LLM",
                "python-modules": [
                    "airflow_llm_async.triggers.chat",
                    "airflow_llm_async.triggers.fanout",
                    "airflow_llm_async.triggers.batch",
                ],
            },
        ],
        "operators": [
            {
                "integration-name": "LLM",
                "python-modules": [
                    "airflow_llm_async.operators.llm",
                    "airflow_llm_async.operators.branch",
                    "airflow_llm_async.operators.fanout",
                ],
            },
        ],
        "task-decorators": [
            {"name": "llm_deferred", "class-name": "airflow_llm_async.decorators.llm.llm_deferred_task"},
            {"name": "llm_fanout", "class-name": "airflow_llm_async.decorators.llm.llm_fanout_task"},
        ],
        "config": {
            "llm_async": {
                "description": "Options for airflow-llm-async operators.",
                "options": {
                    "start_from_trigger": {
                        "description": "Default of LLMOperator's start_from_trigger: start LLM tasks "
                        "directly in the triggerer and end them there, never taking a worker slot.",
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": "True",
                        "default": "False",
                    },
                    "prebuild_execution_api": {
                        "description": "Have each triggerer build its in-process Execution API in a "
                        "background thread as it starts, instead of inside its first trigger's request "
                        "(5-16 s later for the first tasks after a restart). See docs/performance.md, "
                        "'Cold triggerer'.",
                        "version_added": "0.6.0",
                        "type": "boolean",
                        "example": "False",
                        "default": "True",
                    },
                    "prices_file": {
                        "description": "A JSON file of model prices in US dollars per million tokens, "
                        '{"model": {"input": 2.5, "output": 10}}, over the built-in defaults; a '
                        "connection's `prices` extra overrides both. See docs/cost.md.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/opt/airflow/llm_prices.json",
                        "default": None,
                    },
                },
            },
        },
        "integrations": [
            {
                "integration-name": "LLM",
                "external-doc-url": "https://platform.openai.com/docs/api-reference/chat",
            },
        ],
        # `airflow llm monitor`; the dashboard plugin is an `airflow.plugins` entry point (pyproject.toml).
        "cli": ["airflow_llm_async.monitor.cli.get_cli_commands"],
    }
