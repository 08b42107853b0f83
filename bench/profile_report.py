"""Summarise a py-spy raw (collapsed stacks) profile of a benchmark worker, focused on our code.

    python bench/triggerer_capacity.py --sizes 5000 --profile /tmp/trigger.raw
    python bench/profile_report.py /tmp/trigger.raw

The benchmarks record with ``py-spy record --gil``: only samples of the thread holding the GIL,
i.e. time spent running Python, so a thread waiting for the GIL or for I/O is not counted.
Prints, as % of all samples: the inclusive share of each function of ``airflow_llm_async``, what
each of them spends it on (its own lines, or the library function it calls), and the top leaves.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """[(frames as (function, file), count)] from py-spy's ``--format raw`` output."""
    samples = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for raw in stack.split(";"):
            match = _FRAME.match(raw)
            frames.append((match["func"], match["file"]) if match else (raw, ""))
        samples.append((frames, int(count)))
    return samples


def label(frame: tuple[str, str]) -> str:
    func, file = frame
    return f"{file}:{func}" if file else func


def package(file: str) -> str:
    """The top-level package of a frame's file, as py-spy prints it (relative to sys.path)."""
    first = file.split("/", 1)[0]
    return first.removesuffix(".py") if first else "?"


def summarise(samples: list[tuple[list[tuple[str, str]], int]], focus: str, top: int) -> None:
    total = sum(count for _, count in samples)
    inclusive: Counter[str] = Counter()
    spent_on: Counter[tuple[str, str]] = Counter()
    leaves: Counter[str] = Counter()
    in_focus = 0
    for frames, count in samples:
        ours = [i for i, frame in enumerate(frames) if frame[1].startswith(f"{focus}/")]
        for name in {label(frames[i]) for i in ours}:
            inclusive[name] += count
        leaves[label(frames[-1])] += count
        if not ours:
            continue
        in_focus += count
        deepest = ours[-1]
        callee = frames[deepest + 1] if deepest + 1 < len(frames) else None
        what = "(own lines)" if callee is None else f"{package(callee[1])}: {callee[0]}"
        spent_on[(label(frames[deepest]), what)] += count

    def pct(count: int) -> str:
        return f"{100 * count / total:5.1f}%"

    print(f"{total} samples; {pct(in_focus)} inside {focus}\n")
    print(f"Inclusive share of {focus} functions:")
    for name, count in inclusive.most_common(top):
        print(f"  {pct(count)}  {name}")
    print(f"\nWhere that goes (deepest {focus} frame -> what it runs):")
    for (name, what), count in spent_on.most_common(top):
        print(f"  {pct(count)}  {name} -> {what}")
    print("\nTop leaf functions (self time), whole process:")
    for name, count in leaves.most_common(top):
        print(f"  {pct(count)}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("profile", type=Path, help="py-spy --format raw output")
    parser.add_argument("--focus", default="airflow_llm_async", help="package to attribute to")
    parser.add_argument("--top", type=int, default=25, help="lines per section")
    args = parser.parse_args()
    summarise(parse(args.profile), args.focus, args.top)


if __name__ == "__main__":
    main()
