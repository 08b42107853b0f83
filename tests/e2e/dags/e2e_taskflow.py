"""The TaskFlow way: @task.llm_deferred (mapped and typed) and @task.llm_fanout between plain @tasks."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task
from pydantic import BaseModel


class Digest(BaseModel):  # at module scope: workers import it when they parse the DAG
    title: str
    words: int


with DAG(
    "e2e_taskflow", schedule=None, start_date=datetime(2024, 1, 1), catchup=False, default_args={"retries": 0}
) as dag:

    @task
    def articles() -> list[str]:
        return [
            "Ada Lovelace wrote the first program.",
            "Alan Turing defined computation.",
            "Grace Hopper built a compiler.",
        ]

    @task.llm_deferred(model="gpt-4", system_prompt="Summarize in one sentence.")
    def summarize(article: str) -> str:
        return f"Summarize: {article}"

    # The first model answers with something that is not JSON (the test sets that fault): the schema
    # check sends the call down the chain.
    @task.llm_deferred(model="gpt-4o", fallback_models=["gpt-4o-mini"], output_type=Digest)
    def digest(summaries: list[str]) -> str:
        return "Give a title and a word count for: " + " ".join(summaries)

    @task.llm_fanout(model="gpt-4", system_prompt="Translate into French.")
    def translate_all(summaries: list[str]) -> list[str]:
        return list(summaries)

    @task
    def report(summaries: list[str], digest: dict, translations: list[str]) -> dict:
        return {
            "summaries": len(summaries),
            "digest": Digest.model_validate(digest).model_dump(),
            "translations": [len(t) > 0 for t in translations],
        }

    summaries = summarize.expand(article=articles())
    report(summaries, digest(summaries), translate_all(summaries))
