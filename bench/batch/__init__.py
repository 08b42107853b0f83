"""``python -m bench.batch``: the Batch API behind the fan-out operator (issue 13's targets)."""
