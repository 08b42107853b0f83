"""The article's content pipeline with every summary asked through the Batch API, at half price.

start >> extract_data >> validate_data >> summarize_articles >> aggregate_results >> analyze_trends >> end

Same shape, ids and defaults as ``llm_content_pipeline_fanout``; only ``summarize_articles`` differs:
``batch=True`` sends every article as one line of a JSONL file (``POST /files``, ``POST /batches``)
instead of one request each. The task waits in the triggerer, holding no worker slot, until the batch
ends (within its completion window, 24 h at OpenAI: a nightly pipeline, not an interactive one), then
its XCom is the same list of summaries in article order. A summary the batch did not answer well (an
error line, a failed quality rule, an expired batch) is asked again in real time, down the same
gpt-4 -> gpt-3.5-turbo chain. A task retry or a triggerer restart finds the batch it already paid for
(docs/batch.md).

``batch_poll_interval=5`` so that a demo against the fake server (which answers a batch in a second)
ends quickly; against OpenAI leave the default (30 s, growing to 10 min between polls).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task

from airflow_llm_async.core.quality import ARTICLE_RULES
from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import TEXT_PROMPTS, LLMOperator

log = logging.getLogger(__name__)

ARTICLES = [
    {"title": "AI趋势", "content": "人工智能正在快速发展,多模态模型和智能体成为新的热点,企业纷纷加大投入。"},
    {
        "title": "LLM应用",
        "content": "大语言模型改变了开发方式,代码助手、知识库问答和自动化写作已经进入日常工作。",
    },
    {"title": "算力成本", "content": "推理成本持续下降,开源模型让中小团队也能在本地部署自己的大模型服务。"},
    {
        "title": "数据治理",
        "content": "高质量数据成为模型效果的关键,数据清洗、标注与合规审查的重要性不断上升。",
    },
    {
        "title": "工作流编排",
        "content": "用Airflow调度LLM任务,可以获得重试、告警、依赖管理和可观测性等工程能力。",
    },
]


def alert_on_failure(context) -> None:
    """The article's failure alert: one clear line per failed task try (wire your pager in here)."""
    ti = context["ti"]
    log.error(
        "ALERT: task %s.%s failed on try %s: %s",
        ti.dag_id,
        ti.task_id,
        ti.try_number,
        context.get("exception"),
    )


default_args = {
    "owner": "ai_team",
    "depends_on_past": False,
    "retries": 2,
    "retry_delay": timedelta(minutes=5),
    "on_failure_callback": alert_on_failure,
}

with DAG(
    "llm_content_pipeline_batch",
    default_args=default_args,
    description="LLM内容处理工作流 (Batch API, 半价)",
    schedule="@daily",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    tags=["llm", "example"],
) as dag:
    start = EmptyOperator(task_id="start")

    @task(task_id="extract_data")
    def extract_data() -> dict:
        """数据提取任务 (simulated, as in the article)."""
        return {"articles": ARTICLES}

    @task(task_id="validate_data")
    def validate_data(data: dict) -> list[str]:
        """数据验证任务: fail loudly on an empty extract; hand one text per article downstream."""
        articles = data.get("articles", [])
        if not articles:
            raise ValueError("没有提取到文章数据")
        log.info("验证通过: %d 篇文章", len(articles))
        return [f"{a['title']}:{a['content']}" for a in articles]

    extracted = extract_data()
    validated = validate_data(extracted)
    summarize = LLMFanOutOperator(
        task_id="summarize_articles",
        # The triggerer renders this (worker-free): map_indexes=-1 is the pull it can answer, and
        # tojson hands the list over as JSON.
        prompts="{{ ti.xcom_pull(task_ids='validate_data', map_indexes=-1) | tojson }}",
        # The article's summarize instruction, once for every article (its wording, without "{text}").
        system_prompt=TEXT_PROMPTS["zh"]["summarize"].split("\n")[0],
        model="gpt-4",  # the batch goes to gpt-4; gpt-3.5-turbo serves the real-time re-asks
        fallback_models=["gpt-3.5-turbo"],
        # The article's quality rules, per summary; a batch answer that fails them is asked again in
        # real time, and the verdict is recorded in llm_meta.
        quality=ARTICLE_RULES.to_dict(),
        on_quality_failure="return",
        max_failures=1,
        batch=True,
        batch_poll_interval=5,
        batch_retry="realtime",
    )

    @task(task_id="aggregate_results")
    def aggregate_results(summaries: list[str | None]) -> str:
        """结果聚合任务: the batch's list, in article order; a failed summary is None."""
        return "\n\n".join(s for s in summaries if s)

    analyze = LLMOperator(
        task_id="analyze_trends",
        prompt="分析以下内容的趋势:\n{{ ti.xcom_pull(task_ids='aggregate_results') }}",
        model="gpt-4",
        fallback_models=["gpt-3.5-turbo"],
        output_key="analysis",
    )
    end = EmptyOperator(task_id="end")

    aggregated = aggregate_results(summarize.output)
    start >> extracted
    validated >> summarize
    aggregated >> analyze >> end
