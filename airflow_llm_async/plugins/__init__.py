"""Airflow plugins of airflow-llm-async: the LLM dashboard (dashboard.py)."""
