"""``python -m bench.worker_slots``: worker slots and DAG wall time, sync vs deferrable vs worker-free."""
