#!/usr/bin/env python3
"""Benchmark: how fast the command line starts: `build.py --help` and `build.py render web`.

Each is run --runs times as a fresh process (the way a user or CI runs it); the median,
min and max wall times are written to bench/results/startup.json and printed as markdown.
Commands import what they need when they run, so --help loads neither boto3 nor paramiko.

Usage: .venv/bin/python bench/startup.py [--runs 15]
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
COMMANDS = {"build.py --help": ["--help"], "build.py render web": ["render", "web"]}
TARGETS = {"build.py --help": 0.1, "build.py render web": 0.5}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=PROJECT / "bench/results/startup.json")
    args = parser.parse_args()
    result = {}
    for name, argv in COMMANDS.items():
        walls = []
        for _ in range(args.runs):
            started = time.monotonic()
            subprocess.run([sys.executable, "build.py", *argv], cwd=PROJECT, capture_output=True, check=True)
            walls.append(time.monotonic() - started)
        result[name] = {
            "median_s": round(statistics.median(walls), 3),
            "min_s": round(min(walls), 3),
            "max_s": round(max(walls), 3),
            "target_s": TARGETS[name],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": args.runs, "commands": result}, indent=2) + "\n")
    print(f"| command ({args.runs} runs) | median | min-max | target |")
    print("|---|---|---|---|")
    for name, row in result.items():
        print(f"| `{name}` | {row['median_s']} s | {row['min_s']}-{row['max_s']} s | < {row['target_s']} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
