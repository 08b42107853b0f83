"""Fan-out progress in XCom, so a restarted trigger does not pay again for items that already finished.

While the calls run, the trigger pushes the records that finished since its last push as one XCom
*part* of the task instance (``llm_fanout_part_0``, ``_1``, ...), every ``FLUSH_INTERVAL_S`` or
``FLUSH_ITEMS`` records; the interval grows by ``FLUSH_INTERVAL_S`` every ten parts, so a fan-out
that runs for an hour writes about 200 parts, not 1,800 (each one is a round trip to read back and
to delete). A trigger that starts (again) reads the parts back, in order, until a key is
missing, and calls only the items they do not hold. After the task's XComs are pushed, the parts are
deleted.

A part is reused only for the same input: it carries a fingerprint of every item's request and of
the call options. Successes are reused by any later try of the task instance; failures only within
the try that recorded them (a new try is the chance to call them again). Airflow clears a task
instance's XComs when a try starts on a worker, so in deferrable mode a new try starts from nothing;
a worker-free try never starts on a worker, so its parts survive to the next try.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from airflow.sdk.bases.xcom import BaseXCom
from airflow.sdk.execution_time.comms import DeleteXCom, GetXCom
from airflow.sdk.execution_time.xcom import XCom

from airflow_llm_async import compat
from airflow_llm_async.core.outcome import CallSpec

log = logging.getLogger(__name__)

PART_KEY = "llm_fanout_part_{}"
FLUSH_INTERVAL_S = 2.0
FLUSH_ITEMS = 250

Record = dict[str, Any]


def fingerprint(specs: Iterable[CallSpec | Record], options: Mapping[str, Any]) -> str:
    """What the records answer: every item's request (or its input error) and the call options
    (the fan-out's spec without its request and deadline)."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for spec in specs:
        item = spec.request if isinstance(spec, CallSpec) else spec
        digest.update(json.dumps(item, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:32]


def make_part(fingerprint: str, try_number: int, records: Mapping[int, Record]) -> dict[str, Any]:
    return {"fingerprint": fingerprint, "try": try_number, "records": {str(i): r for i, r in records.items()}}


def reusable(parts: Iterable[Any], fingerprint: str, try_number: int, items: int) -> dict[int, Record]:
    """The records in ``parts`` that this try may keep instead of calling the item again."""
    kept: dict[int, Record] = {}
    for part in parts:
        if not isinstance(part, dict) or part.get("fingerprint") != fingerprint:
            continue
        same_try = part.get("try") == try_number
        for key, record in (part.get("records") or {}).items():
            index = int(key)
            if not 0 <= index < items or index in kept and kept[index]["meta"]["status"] == "success":
                continue
            if record["meta"]["status"] == "success" or same_try:
                kept[index] = record
    return kept


class XComProgress:
    """The parts of one task instance, read and written through the configured XCom backend."""

    def __init__(self, ti: Any, fingerprint: str) -> None:
        self._where = {
            "dag_id": ti.dag_id,
            "task_id": ti.task_id,
            "run_id": ti.run_id,
            "map_index": ti.map_index,
        }
        self.try_number = ti.try_number
        self.fingerprint = fingerprint
        self.parts = 0  # parts stored so far, whatever their fingerprint: the next one gets this number

    def flush_interval(self) -> float:
        return FLUSH_INTERVAL_S * (1 + self.parts // 10)

    async def load(self, items: int) -> dict[int, Record]:
        found = []
        while (part := await XCom.aget_one(key=PART_KEY.format(self.parts), **self._where)) is not None:
            found.append(part)
            self.parts += 1
        return reusable(found, self.fingerprint, self.try_number, items)

    async def save(self, records: Mapping[int, Record]) -> None:
        key = PART_KEY.format(self.parts)
        self.parts += 1
        await compat.set_xcom(key, make_part(self.fingerprint, self.try_number, records), **self._where)

    async def delete_all(self) -> None:
        """XCom.delete, made async: the triggerer must not block its event loop on a sync request."""
        from airflow.sdk.execution_time.task_runner import SUPERVISOR_COMMS

        # A custom backend purges its object (e.g. a file in object storage) given the stored reference;
        # the default backend's purge does nothing, so its parts need no read first.
        purges = getattr(XCom.purge, "__func__", None) is not BaseXCom.purge.__func__

        async def delete(key: str) -> None:
            if purges:
                XCom.purge(await SUPERVISOR_COMMS.asend(GetXCom(key=key, **self._where)))
            await SUPERVISOR_COMMS.asend(DeleteXCom(key=key, **self._where))

        # Sent together: the supervisor answers them one by one, without a round trip's wait between.
        await asyncio.gather(*(delete(PART_KEY.format(number)) for number in range(self.parts)))
        self.parts = 0
