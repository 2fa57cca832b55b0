#!/usr/bin/env python3
"""Benchmark: a build in a private subnet through a bastion (real OpenSSH `ssh -W`), next to a direct one.

Both run in one fresh sandbox, alternating (direct first on even runs, bastion first on odd
ones) so that a slower minute hurts both alike. "Direct": `build.py ROLE --sandbox` in the
default VPC, SSH to the builder's public address. "Bastion": `build.py ROLE --sandbox
--subnet-id PRIVATE --bastion admin@BASTION ...`: the builder has no public address and the
host has no route to its private one; every SSH session goes through the bastion.

Usage (as root, from the project): .venv/bin/python bench/bastion_build.py [ROLE] [--runs N]
Writes bench/results/bastion-build.json and bench/results/bastion-build.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from builder.sandbox import control  # noqa: E402
from tests.sandbox import World, bastion, private_network  # noqa: E402


def one_build(world: World, role: str, extra: list[str], manifest: Path) -> dict[str, Any]:
    started = time.monotonic()
    done = world.cli(role, "--sandbox", *extra, "--manifest", str(manifest))
    wall = time.monotonic() - started
    if done.returncode != 0:
        return {"ok": False, "wall_s": round(wall, 2), "error": done.stderr.strip().splitlines()[-1:]}
    record = json.loads(manifest.read_text())
    steps = {s["step"]: s["seconds"] for s in record["steps"]}
    return {
        "ok": True,
        "wall_s": round(wall, 2),
        "ssh_connect_s": steps.get("connect over SSH"),
        "api_calls": record.get("api_calls"),
        "steps": steps,
    }


def summary(runs: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    values = [r[key] for r in runs if r["ok"] and r.get(key) is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="web")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=PROJECT / "bench/results/bastion-build.json")
    args = parser.parse_args()

    modes: dict[str, list[dict[str, Any]]] = {"direct": [], "bastion": []}
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        world = World.start(work / "sandbox")
        try:
            private, public = private_network(world.client(), "10.40.0.0/16")
            jump = bastion(world, public, work / "bastion")
            through = ["--subnet-id", private, "--bastion", jump.spec]
            through += ["--bastion-known-hosts", str(jump.known_hosts), "--bastion-identity", str(jump.key_file)]
            for n in range(args.runs):
                order = ("direct", "bastion") if n % 2 == 0 else ("bastion", "direct")
                for mode in order:
                    extra = through if mode == "bastion" else []
                    result = one_build(world, args.role, extra, work / f"{mode}-{n}.json")
                    modes[mode].append(result)
                    print(f"run {n + 1}/{args.runs} {mode}: {result['wall_s']} s", file=sys.stderr)
        finally:
            control.reset(world.state)

    table = {mode: {key: summary(runs, key) for key in ("wall_s", "ssh_connect_s")} for mode, runs in modes.items()}
    result = {
        "role": args.role,
        "runs": modes,
        "summary": table,
        "machine": subprocess.run(["uname", "-srm"], capture_output=True, text=True, check=False).stdout.strip(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"| `{args.role}` in the sandbox ({args.runs} runs each) | median (s) | min (s) | max (s) | failed |",
        "|---|---|---|---|---|",
    ]
    for mode, label in (("direct", "direct: public address"), ("bastion", "private subnet, through a bastion")):
        failed = sum(not r["ok"] for r in modes[mode])
        for key, what in (("wall_s", "command start to AMI"), ("ssh_connect_s", "launch to SSH session")):
            row = table[mode][key] or {"median": "-", "min": "-", "max": "-"}
            lines.append(f"| {label}: {what} | {row['median']} | {row['min']} | {row['max']} | {failed} |")
    print("\n".join(lines))
    print(f"\nwritten to {args.out.relative_to(PROJECT)}", file=sys.stderr)
    return 0 if all(r["ok"] for runs in modes.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
