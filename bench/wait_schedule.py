#!/usr/bin/env python3
"""Benchmark: what the learned wait schedule costs, in looks and in seconds past the end, for each price of a look.

A build waits three times on its critical path: the launch, the snapshots (both; the slower
counts), the image. Here those waits are drawn as the sandbox's `realistic` model draws them
(launch: median 15 s, CV 0.4; each snapshot: 40 s plus 10 s per GiB written, CV 0.3 each, the
root holding about 1 GiB and the data volume little; image: 10 s, CV 0.3), and the tool's own
schedule (builder.aws.waits: Waits, wait_for) waits for them on a simulated clock, build after
build, learning as it goes. For each price of a look (LOOK_COST, seconds of waiting one EC2 call
is worth) it reports, per learnt build, the looks of the three waits together and the seconds
they were seen late together (median, mean, p90). It shows the trade between the calls a build
makes and its wall time; the tool's choice is 0.75 s.

Usage: .venv/bin/python bench/wait_schedule.py [--builds 300] [--seed 7]
Writes bench/results/wait-schedule.json and its markdown (wait-schedule.md), and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from builder.aws import waits  # noqa: E402
from builder.sandbox.latency import lognormal  # noqa: E402

COSTS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
LEARNING = 8  # builds before the schedule is taken as learnt (what Waits keeps)


def draws(rng: random.Random) -> dict[str, float]:
    """One build's three critical waits, as the realistic model draws them."""
    snapshots = [lognormal(rng, 40, 0.3) + gib * lognormal(rng, 10, 0.3) for gib in (1.0, 0.01)]
    return {"instance-running": lognormal(rng, 15, 0.4), "snapshots": max(snapshots), "image": lognormal(rng, 10, 0.3)}


def simulate(cost: float, builds: int, seed: int) -> dict[str, list[float]]:
    """Run ``builds`` builds' waits with looks priced at ``cost``; return per learnt build its looks and lateness."""
    clock = waits.SimulatedClock()
    waits.time = clock  # type: ignore[assignment,attr-defined]
    waits.LOOK_COST = cost
    rng = random.Random(seed)  # noqa: S311 (a simulation's draws, no secret)
    looks: list[float] = []
    late: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        kept = waits.Waits(Path(tmp) / "waits.json")
        for build in range(builds):
            build_looks, build_late = 0, 0.0
            for kind, ends in draws(rng).items():
                start, count = clock.now, 0

                def describe(ends: float = ends, start: float = start) -> str:
                    nonlocal count
                    count += 1
                    return "done" if clock.now - start >= ends else "going"

                waits.wait_for(kept, kind, kind, describe, "done", timeout=3600)
                build_looks += count
                build_late += clock.now - start - ends
            if build >= LEARNING:
                looks.append(build_looks)
                late.append(build_late)
    return {"looks": looks, "late_s": late}


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "mean": round(statistics.fmean(values), 2),
        "p90": round(statistics.quantiles(values, n=10, method="inclusive")[8], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=PROJECT / "bench/results/wait-schedule.json")
    args = parser.parse_args()
    chosen = waits.LOOK_COST
    rows = {str(cost): {k: spread(v) for k, v in simulate(cost, args.builds, args.seed).items()} for cost in COSTS}
    result = {"builds": args.builds, "learnt_after": LEARNING, "seed": args.seed, "chosen": chosen, "costs": rows}
    lines = [
        f"Learnt builds: {args.builds - LEARNING} (seed {args.seed}); per build, the launch, snapshot and image "
        "waits together. The tool's price of a look: "
        f"{chosen} s.",
        "",
        "| price of a look | looks: median (mean, p90) | seen late: median (mean, p90) |",
        "|---|---|---|",
    ]
    for cost, row in rows.items():
        mark = " (the tool's)" if float(cost) == chosen else ""
        lo, la = row["looks"], row["late_s"]
        lines.append(
            f"| {cost} s{mark} | {lo['median']} ({lo['mean']}, {lo['p90']}) | "
            f"{la['median']} s ({la['mean']} s, {la['p90']} s) |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
