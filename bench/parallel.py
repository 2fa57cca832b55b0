#!/usr/bin/env python3
"""Benchmark: three roles built in parallel in the sandbox, against the same three one at a time.

Runs `build.py ROLE --sandbox` for web, database and management one after the other
(each timed), then `build.py web database management --jobs 3 --sandbox` (timed), and
repeats the pair --runs times, interleaved. Each build is a full build: machine, apt,
scripts, snapshots, AMI.

Usage (as root): .venv/bin/python bench/parallel.py [--runs 2]
Writes bench/results/parallel.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from builder.sandbox import control  # noqa: E402

ROLES = ("web", "database", "management")


def timed(*args: str) -> float:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "build.py", *args, "--sandbox"], cwd=PROJECT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"build.py {' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=PROJECT / "bench/results/parallel.json")
    args = parser.parse_args()
    control.start()
    runs = []
    for n in range(args.runs):
        singles = {role: round(timed(role), 1) for role in ROLES}
        together = round(timed(*ROLES, "--jobs", "3"), 1)
        runs.append(
            {"one_at_a_time": singles, "sum_one_at_a_time": round(sum(singles.values()), 1), "jobs_3": together}
        )
        print(
            f"run {n + 1}/{args.runs}: {singles} sum {sum(singles.values()):.1f} s; --jobs 3 {together} s",
            file=sys.stderr,
        )
    summary = {
        "sum_one_at_a_time_s": statistics.median(r["sum_one_at_a_time"] for r in runs),
        "jobs_3_s": statistics.median(r["jobs_3"] for r in runs),
        "web_alone_s": statistics.median(r["one_at_a_time"]["web"] for r in runs),
    }
    summary["jobs_3_over_sum"] = round(summary["jobs_3_s"] / summary["sum_one_at_a_time_s"], 2)
    summary["jobs_3_over_3x_web"] = round(summary["jobs_3_s"] / (3 * summary["web_alone_s"]), 2)
    result = {
        "roles": ROLES,
        "runs": runs,
        "summary": summary,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| web + database + management in the sandbox (median of {args.runs}) | seconds |")
    print("|---|---|")
    print(f"| one at a time (sum of three builds) | {summary['sum_one_at_a_time_s']} |")
    print(f"| `--jobs 3` (wall) | {summary['jobs_3_s']} ({summary['jobs_3_over_sum']} of the sum) |")
    print(f"| `web` alone; 3 times that | {summary['web_alone_s']}; {round(3 * summary['web_alone_s'], 1)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
