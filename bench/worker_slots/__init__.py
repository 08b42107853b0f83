"""``python -m bench.worker_slots``: worker slots and DAG wall time of N LLM tasks on a real Airflow.

Suites: sync vs deferrable vs worker-free ``LLMOperator``; common.ai's ``@task.llm`` vs ours.
"""
