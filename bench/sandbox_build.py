#!/usr/bin/env python3
"""Benchmark: `python build.py ROLE --sandbox`, from command start to AMI, split into parts.

For each run: the wall time of the whole command; the time the builder spends in the
role's scripts (provision.sh with apt, verify.sh, image-hygiene.sh, as the tool reports
them) and in apt alone (provision.sh's "packages: installed in N s"); the time of
the machine booting until sshd answers and halting; the rest is our overhead, the tool's
and the sandbox's (Python start, API calls, machine set-up, copies for snapshots).

Usage (as root, from the project): .venv/bin/python bench/sandbox_build.py [ROLE] [--runs N]
Writes bench/results/sandbox-build.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from builder.sandbox import control  # noqa: E402

SCRIPT = re.compile(r"(provision|verify|image-hygiene)\.sh passed in ([0-9.]+) s")
APT = re.compile(r"packages: installed in (\d+) s")


def one_run(role: str, work: Path, n: int) -> dict[str, float]:
    manifest = work / f"{role}-{n}.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "build.py", role, "--sandbox", "-v", "--manifest", str(manifest)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"run {n}: build.py exited {done.returncode}:\n{done.stderr[-2000:]}")
    scripts = sum(float(m.group(2)) for m in SCRIPT.finditer(done.stderr))
    apt = sum(float(m.group(1)) for m in APT.finditer(done.stderr))
    steps = {s["step"]: s["seconds"] for s in json.loads(manifest.read_text())["steps"]}
    # The machine's own time besides the scripts: booting until sshd answers, and halting.
    machine = steps["connect over SSH"] + steps.get("stop builder", 0.0)  # no stop by default
    overhead = wall - scripts - machine
    return {
        "wall_s": round(wall, 2),
        "scripts_s": round(scripts, 2),
        "apt_s": apt,
        "machine_boot_halt_s": round(machine, 2),
        "overhead_s": round(overhead, 2),
        "overhead_share": round(overhead / wall, 3),
        "api_calls": json.loads(manifest.read_text())["api_calls"],
        **{f"step: {k}": v for k, v in steps.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="web")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=PROJECT / "bench/results/sandbox-build.json")
    args = parser.parse_args()

    started = time.monotonic()
    was_running = control.running() is not None
    control.start()
    sandbox_start = time.monotonic() - started
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for n in range(args.runs):
            runs.append(one_run(args.role, Path(work), n))
            print(f"run {n + 1}/{args.runs}: {runs[-1]['wall_s']} s", file=sys.stderr)

    latency = control.status().get("latency")

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 2)

    summary = {
        key: {"median": median(key), "min": min(r[key] for r in runs), "max": max(r[key] for r in runs)}
        for key in ("wall_s", "scripts_s", "apt_s", "machine_boot_halt_s", "overhead_s", "overhead_share")
    }
    result = {
        "role": args.role,
        "runs": runs,
        "summary": summary,
        "sandbox_start_s": None if was_running else round(sandbox_start, 2),
        # The sandbox's latency model with its seed (None: instant EC2, nothing drawn).
        "latency": latency,
        "seed": latency["seed"] if latency else None,
        "machine": subprocess.run(["uname", "-srm"], capture_output=True, text=True, check=False).stdout.strip(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| `{args.role}` in the sandbox ({args.runs} runs) | median | min | max |")
    print("|---|---|---|---|")
    for key, label in (
        ("wall_s", "command start to AMI (s)"),
        ("scripts_s", "in the role's scripts (s)"),
        ("apt_s", "of which apt (s)"),
        ("machine_boot_halt_s", "machine booting to SSH and halting (s)"),
        ("overhead_s", "our overhead: tool + sandbox (s)"),
        ("overhead_share", "our overhead, share of the total"),
    ):
        row = summary[key]
        print(f"| {label} | {row['median']} | {row['min']} | {row['max']} |")
    print(f"\nwritten to {args.out.relative_to(PROJECT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
