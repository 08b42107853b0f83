"""Worker-free LLM tasks: they start and end in the triggerer; downstream tasks read their XComs."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, XComArg, task

from airflow_llm_async.operators.llm import LLMOperator, TextProcessingOperator

with DAG(
    "e2e_worker_free",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    params={"topic": "大语言模型"},
    default_args={"retries": 0},
) as dag:

    @task(task_id="topic")
    def topic() -> str:
        return "数据工程中的自动化"

    ask = LLMOperator(
        task_id="ask",
        prompt="分析以下内容的趋势: {{ params.topic }}与{{ ti.xcom_pull(task_ids='topic', map_indexes=-1) }}",
        output_key="analysis",
        start_from_trigger=True,
    )
    translate = TextProcessingOperator(
        task_id="translate",
        operation="translate",
        text="{{ ti.xcom_pull(task_ids='ask', key='analysis', map_indexes=-1) }}",
        start_from_trigger=True,
    )
    fails = LLMOperator(task_id="fails", prompt="x", model="gpt-5x", start_from_trigger=True)

    @task(task_id="read_results")
    def read_results(answer: str, meta: dict, translation: str) -> dict:
        # XComs pushed by the trigger arrive as JSON: a str stays a str, the meta a dict.
        return {
            "answer_chars": len(answer),
            "model": meta["model"],
            "tokens": meta["usage"]["total_tokens"],
            "translation_chars": len(translation),
        }

    topic() >> ask >> translate
    read_results(ask.output, XComArg(ask, key="llm_meta"), translate.output)
