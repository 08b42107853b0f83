"""The monitor's snapshot as plain-text tables for a terminal (I/O-free)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from airflow_llm_async.monitor import batches

# C0 controls (ESC among them), DEL and C1 controls: a terminal acts on them. Model names, errors, DAG
# and run ids, hosts come from servers and DAG authors: printed raw, they set the terminal's title,
# clear the screen or hide a row.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with each control character shown as an escape (``\\x1b``) instead of acting."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Left-aligned columns, two spaces apart; every cell is :func:`printable`."""
    cells = [[printable(str(h)) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return [indent + line.rstrip() for line in lines]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return printable(str(value))


def money(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def render(snapshot: dict[str, Any]) -> str:
    """The whole snapshot: triggerers, processes, per DAG and model, totals."""
    when = datetime.fromtimestamp(snapshot["generated_at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"LLM calls in the last {snapshot['window_s'] / 60:g} min, at {when}", ""]
    lines += _triggerers(snapshot["triggerers"], snapshot["unassigned_triggers"])
    if snapshot["processes"]:
        lines.append("Processes that ran calls")
        lines += table(
            ["process", "calls", "done/min"],
            [[p["process"], p["calls"], p["completions_per_min"]] for p in snapshot["processes"]],
        )
        lines.append("")
    lines += _models(snapshot["models"])
    lines += _circuits(snapshot.get("circuits") or [])
    lines += _budgets(snapshot.get("budgets") or [])
    lines += _batches_waiting(snapshot.get("batches_waiting") or [])
    lines += _batch_costs(snapshot.get("batch_costs") or [], snapshot.get("batch_cost_totals"))
    totals = snapshot["totals"]
    lines += [
        "",
        f"Total: {totals['calls']} calls, {totals['failures']} failed, {totals['total_tokens']} tokens, "
        f"${money(totals['cost_usd'])}",
    ]
    return "\n".join(lines)


def _triggerers(triggerers: list[dict[str, Any]], unassigned: int) -> list[str]:
    if not triggerers:
        lines = ["Triggerers", "  (no triggerer running)"]
    else:
        headers = ["id", "host", "alive", "heartbeat s", "triggers", "llm", "capacity left", "done/min"]
        rows = [
            [
                *(t["id"], t["hostname"], t["alive"], t["heartbeat_age_s"]),
                *(
                    t["triggers_running"],
                    t["llm_triggers_running"],
                    "-" if t["capacity_left"] is None else f"{t['capacity_left']} of {t['capacity']}",
                ),
                f"{t['completions_per_min']}{' (host)' if t['host_shared'] else ''}",
            ]
            for t in triggerers
        ]
        lines = ["Triggerers", *table(headers, rows)]
    return [*lines, f"  triggers waiting for a triggerer: {unassigned}", ""]


def _models(models: list[dict[str, Any]]) -> list[str]:
    if not models:
        return ["Per DAG and model", "  (no LLM calls in this window)"]
    headers = ["dag", "model", "calls", "failed", "p50 s", "p95 s", "tokens", "cost $"]
    rows = [
        [
            *(m["dag_id"], m["model"], m["calls"], m["failures"]),
            *(m["latency_p50_s"], m["latency_p95_s"], m["total_tokens"], money(m["cost_usd"])),
        ]
        for m in models
    ]
    return ["Per DAG and model", *table(headers, rows)]


_KEPT_IN = {"redis": "Redis, for every host", "xcom": "each process; spent as llm_meta recorded it"}


def _circuits(circuits: list[dict[str, Any]]) -> list[str]:
    """Models whose circuit breaker skipped calls, or whose shared state is known (Redis)."""
    if not circuits:
        return []
    headers = ["connection", "model", "state", "failures", "last error", "probe at", "skipped calls"]
    rows = [
        [c["conn_id"], c["model"], c["status"] or "-", c["failures"], c["last_error"] or "-",
         _clock(c["probe_at"]) if c["status"] in ("open", "half_open") else "-", c["skipped"]]
        for c in circuits
    ]  # fmt: skip
    return ["", "Circuit breakers (skipped calls in the window; live state when shared through Redis)",
            *table(headers, rows)]  # fmt: skip


def _clock(epoch: float | None) -> str:
    return "-" if epoch is None else datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S UTC")


def _budgets(budgets: list[dict[str, Any]]) -> list[str]:
    if not budgets:
        return []
    headers = ["connection", "budget $", "period (UTC)", "spent $", "left $", "kept in"]
    rows = [
        [
            *(b["conn_id"], f"{b['budget_usd']:g} per {b['per']}", b["period"]),
            *(money(b["spent_usd"]), money(b["left_usd"]), _KEPT_IN.get(b["source"], b["source"])),
        ]
        for b in budgets
    ]
    return ["", "Budgets (budget_usd)", *table(headers, rows)]


def _batches_waiting(rows: list[dict[str, Any]]) -> list[str]:
    """Tasks whose batches (Batch API) are still waiting, the most recently updated first."""
    if not rows:
        return []
    headers = ["dag", "run", "task", "batches", "status", "completed/failed of total", "age"]
    table_rows = [
        [
            *(r["dag_id"], r["run_id"], batches.task_label(r["task_id"], r["map_index"])),
            *(batches.ids_text(r), batches.status_text(r["statuses"])),
            *(f"{r['completed']}/{r['failed']} of {r['total']}", batches.age_text(r["age_s"])),
        ]
        for r in rows
    ]
    return ["", "Batches waiting (Batch API)", *table(headers, table_rows)]


def _batch_costs(rows: list[dict[str, Any]], totals: dict[str, Any] | None) -> list[str]:
    """Per DAG and model, of the batch tasks that ended in the window: batch cost, real-time cost, saved."""
    if not rows:
        return []
    headers = [
        "dag",
        "model",
        "tasks",
        "batch answers",
        "real-time re-asks",
        "batch $",
        "real time $",
        "saved $",
    ]
    table_rows = [
        [
            *(r["dag_id"], r["model"], r["tasks"], r["batch_items"], r["realtime_items"]),
            *(money(r["cost_usd"]), money(r["realtime_cost_usd"]), money(r["saved_usd"])),
        ]
        for r in rows
    ]
    lines = ["", "Batch API cost (batch tasks that ended in the window)", *table(headers, table_rows)]
    if totals:
        lines.append(
            f"  batch answers: ${money(totals['cost_usd'])} at the batch price, "
            f"${money(totals['realtime_cost_usd'])} in real time: saved ${money(totals['saved_usd'])}"
        )
        if totals["unpriced_tasks"]:
            lines.append(f"  tasks whose model has no known price (not summed): {totals['unpriced_tasks']}")
    return lines
