"""The article's error handling: a quality branch after an LLM answer, and model fallback.

generate_answer >> quality_check >> [retry_task, fallback_task, continue_task]

``quality_check`` applies the article's rules to the answer: fewer than 50 characters ->
``retry_task``; contains 错误 or 抱歉 -> ``fallback_task``; otherwise ``continue_task``.
The article's ``retry_with_fallback`` (try gpt-4, on error call gpt-3.5-turbo) becomes a
fallback chain inside the trigger, which also moves on when an answer fails the quality
rules, so neither retry path ever holds a worker slot.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param

from airflow_llm_async.core.quality import ARTICLE_RULES
from airflow_llm_async.operators.branch import LLMQualityBranchOperator
from airflow_llm_async.operators.llm import LLMOperator

with DAG(
    "llm_error_handling",
    default_args={"owner": "ai_team", "retries": 2, "retry_delay": timedelta(minutes=5)},
    description="LLM输出质量检查与降级",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    params={"question": Param("请分析大语言模型在数据工程中的应用前景。", type="string")},
    tags=["llm", "example"],
) as dag:
    generate = LLMOperator(task_id="generate_answer", prompt="{{ params.question }}", model="gpt-4")

    quality_check = LLMQualityBranchOperator(task_id="quality_check", source_task_id="generate_answer")

    # Too short: ask again, and let the trigger move to gpt-3.5-turbo if gpt-4 stays short.
    retry_task = LLMOperator(
        task_id="retry_task",
        prompt="重试处理: {{ params.question }}\n请给出完整、详细的回答。",
        model="gpt-4",
        fallback_models=["gpt-3.5-turbo"],
        quality={"min_chars": ARTICLE_RULES.min_chars},
        quality_retries=1,
    )

    # A refusal or an error message: the article's gpt-4 -> gpt-3.5-turbo fallback, which here
    # also applies when gpt-4 answers with a refusal again.
    fallback_task = LLMOperator(
        task_id="fallback_task",
        prompt="处理任务: {{ params.question }}",
        model="gpt-4",
        fallback_models=["gpt-3.5-turbo"],
        quality=ARTICLE_RULES.to_dict(),
    )

    continue_task = EmptyOperator(task_id="continue_task")

    generate >> quality_check >> [retry_task, fallback_task, continue_task]
