"""Monitoring of LLM calls: the figures (``figures``), read from the metadata DB (``db``), shown by
``airflow-llm monitor`` (``cli``) and by the dashboard plugin (``airflow_llm_async.plugins``)."""
