"""``airflow-llm monitor`` (also ``airflow llm monitor``): the LLM calls and triggerers, from the metadata DB.

Reads the DB that the Airflow configuration in the environment points at (``AIRFLOW_HOME`` /
``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``), so it sees every triggerer of the deployment, wherever it runs.
Live by default (the tables redrawn every ``--interval`` seconds; Ctrl-C exits); ``--once --json`` prints
one snapshot for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

# (flags, argparse keyword arguments): shared by the console script and the Airflow CLI command.
_ARGUMENTS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--once",), {"action": "store_true", "help": "print one snapshot and exit"}),
    (("--json",), {"action": "store_true", "help": "JSON instead of tables (one object per refresh)"}),
    (("--interval",), {"type": float, "default": 5.0, "help": "seconds between refreshes (default 5)"}),
    (
        ("--window",),
        {"type": float, "default": 60.0, "help": "minutes of LLM calls to count (default 60)"},
    ),
    (
        ("--capacity",),
        {"type": int, "default": None, "help": "each triggerer's capacity (default: [triggerer] capacity)"},
    ),
]
_HELP = "Show LLM calls (per DAG and model) and triggerers (in flight, capacity left) from the metadata DB"
# The module docstring, as a terminal shows it: reST's ``literal`` marks are noise in --help.
_DESCRIPTION = (__doc__ or "").replace("``", "")


def main(argv: list[str] | None = None) -> int:
    """The ``airflow-llm`` console script."""
    parser = argparse.ArgumentParser(prog="airflow-llm", description="Tools of airflow-llm-async.")
    commands = parser.add_subparsers(dest="command", required=True)
    monitor_parser = commands.add_parser("monitor", help=_HELP, description=_DESCRIPTION)
    for flags, kwargs in _ARGUMENTS:
        monitor_parser.add_argument(*flags, **kwargs)
    args = parser.parse_args(argv)
    return monitor(args)


def monitor(args: argparse.Namespace) -> int:
    error = _check(args)
    if error:
        print(f"airflow-llm monitor: {error}", file=sys.stderr)
        return 2
    from airflow.utils.session import create_session
    from sqlalchemy.exc import SQLAlchemyError

    from airflow_llm_async.monitor import db, text

    def show() -> bool:
        try:
            with create_session() as session:
                snapshot = db.load_snapshot(session, window_s=args.window * 60, capacity=args.capacity)
        except SQLAlchemyError as exc:
            # The message names the table or the server, never the connection's password.
            print(
                f"airflow-llm monitor: cannot read the metadata DB ({type(exc).__name__}: "
                f"{text.printable(str(getattr(exc, 'orig', None) or exc))}); point AIRFLOW_HOME or "
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN at the deployment's DB (migrated: airflow db migrate)",
                file=sys.stderr,
                flush=True,
            )
            return False
        if args.json:
            print(json.dumps(snapshot), flush=True)
        elif args.once:
            print(text.render(snapshot), flush=True)
        else:
            # Home the cursor and clear the screen, then draw: a plain redraw any terminal understands.
            print("\x1b[H\x1b[2J" + text.render(snapshot), flush=True)
        return True

    if args.once:
        return 0 if show() else 1
    try:
        while True:
            show()  # live: a DB that is away for a while is tried again at the next refresh
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> str | None:
    if args.interval <= 0:
        return f"--interval must be more than 0 seconds, got {args.interval:g}"
    if args.window <= 0:
        return f"--window must be more than 0 minutes, got {args.window:g}"
    if args.capacity is not None and args.capacity <= 0:
        return f"--capacity must be a positive number of triggers, got {args.capacity}"
    return None


def _airflow_command(args: argparse.Namespace) -> None:
    status = monitor(args)
    if status:
        raise SystemExit(status)


def get_cli_commands() -> list:
    """``airflow llm monitor``: the provider's ``cli`` entry in get_provider_info."""
    from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand

    return [
        GroupCommand(
            name="llm",
            help="LLM calls of airflow-llm-async",
            subcommands=[
                ActionCommand(
                    name="monitor",
                    help=_HELP,
                    func=_airflow_command,
                    args=[Arg(flags, **kwargs) for flags, kwargs in _ARGUMENTS],
                    description=_DESCRIPTION,
                )
            ],
        )
    ]


if __name__ == "__main__":
    sys.exit(main())
