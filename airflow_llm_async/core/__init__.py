"""The I/O-free part of the provider: nothing here awaits, sleeps, opens sockets or imports Airflow.

``protocol`` (request bodies, response parsing, error classification), ``retry`` (when to try
again), ``quality`` (quality gates), ``pricing`` and ``tokens`` (what a call costs), ``buckets``
(rate-limit arithmetic), ``fanout`` (many items, one summary), ``outcome`` (the typed call spec and
result that travel in trigger kwargs and events) and ``engine`` (the call as a state machine).
Everything that does I/O drives these: ``driver``, ``transport``, ``limits``, the triggers and
operators.
"""
