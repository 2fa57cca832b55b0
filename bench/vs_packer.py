#!/usr/bin/env python3
"""Benchmark: our build against Packer 1.6.6's amazon-ebs, side by side, with EC2's waiting modelled.

Both build the same AMI (a root and a data volume at /dev/sdf, provisioned by the same
three scripts: our rendered provision.sh, verify.sh and image-hygiene.sh, which Packer runs
as its shell provisioner) against the same endpoint: a sandbox started with the EC2 latency
model (`realistic`, scaled by --scale, its draws seeded by --seed, recorded in the results) and
API throttling, so each tool's instances are real machines reached over SSH and every wait
takes the modelled time. Three contenders,
interleaved run by run (A B C A B C ...): ours, Packer with its defaults (waiters poll every
15 s) and Packer with AWS_POLL_DELAY_SECONDS=1. Ours learns how long each kind of wait takes
(builder.aws.waits.Waits); the bench starts it with nothing learnt and reports that first build
on its own row before the interleaved runs.

For each: wall time (median, min, max); the lower bound no tool can beat, i.e. the modelled
waits on the critical path (instance pending, stopping, snapshot, image; shutting down can
overlap the snapshots) plus the machine's own work (booting to SSH and running the
scripts, as measured in our runs);
wall time over that bound; EC2 calls by action, counted by the endpoint.

Usage (as root): .venv/bin/python bench/vs_packer.py [--runs 5] [--scale 0.1] [--rate 20]
Writes bench/results/vs-packer.json and the markdown table (vs-packer.md), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

import yaml  # noqa: E402

from builder.render import render_role  # noqa: E402
from builder.roles import load_role  # noqa: E402
from builder.sandbox import control  # noqa: E402
from builder.sandbox.latency import Model, new_seed  # noqa: E402

BASE = "ami-000000000000000d2"
FIRST = "ours, first build (no wait history yet)"
ROLE = {
    "description": "benchmark role: nothing to install, one directory on the volume",
    "packages": [],
    "services": [],
    "volume": {"device": "/dev/sdf", "mount_point": "/data", "size_gib": 2},
    "externalize": [{"path": "/srv/app", "owner": "root", "group": "root", "mode": "0755"}],
}


def calls_during(state: Path, run: Any) -> tuple[float, dict[str, int], Any]:
    before = control.status(state)["api_calls_by_action"]
    started = time.monotonic()
    result = run()
    wall = time.monotonic() - started
    after = control.status(state)["api_calls_by_action"]
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)}
    return wall, delta, result


def ours(roles: Path, env: dict[str, str], work: Path, n: int) -> dict[str, Any]:
    manifest = work / f"ours-{n}.json"
    done = subprocess.run(
        [sys.executable, "build.py", "bench", "--roles-dir", str(roles), "--sandbox", "--manifest", str(manifest)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"our build failed:\n{done.stderr[-3000:]}")
    steps = {s["step"]: s["seconds"] for s in json.loads(manifest.read_text())["steps"]}
    return {"machine_work_s": steps["connect over SSH"] + steps["provision, verify, image hygiene"], "steps": steps}


def packer_template(scripts: Path) -> dict[str, Any]:
    """Return the Packer template; endpoint, region and credentials come from `sandbox env`'s exports."""
    upload = [
        {"type": "file", "source": str(scripts / name), "destination": f"/tmp/{name}"}  # noqa: S108 - on the instance
        for name in ("provision.sh", "verify.sh", "image-hygiene.sh")
    ]
    return {
        # Packer 1.6.6's SDK predates AWS_ENDPOINT_URL_EC2: the template reads it.
        "variables": {"endpoint": "{{env `AWS_ENDPOINT_URL_EC2`}}", "region": "{{env `AWS_DEFAULT_REGION`}}"},
        "builders": [
            {
                "type": "amazon-ebs",
                "region": "{{user `region`}}",
                "custom_endpoint_ec2": "{{user `endpoint`}}",
                "source_ami": BASE,
                "instance_type": "t3.small",
                "ssh_username": "admin",
                "ssh_timeout": "300s",
                "ami_name": "packer-bench-{{uuid}}",
                "temporary_security_group_source_cidrs": ["127.0.0.0/8"],
                "launch_block_device_mappings": [
                    {
                        "device_name": "/dev/sdf",
                        "volume_size": 2,
                        "volume_type": "gp3",
                        "iops": 3000,
                        "throughput": 125,
                        "delete_on_termination": True,
                    }
                ],
            }
        ],
        "provisioners": [
            *upload,
            {
                "type": "shell",
                "inline": [
                    "sudo -n bash /tmp/provision.sh ''",
                    "sudo -n bash /tmp/verify.sh",
                    "sudo -n bash /tmp/image-hygiene.sh",
                ],
            },
        ],
    }


def packer(template: Path, poll: float | None, home: Path, state: Path) -> dict[str, Any]:
    env = {**control.loopback_only_env(home), **control.env(state)}
    if poll is not None:
        env["AWS_POLL_DELAY_SECONDS"] = str(poll)
    done = subprocess.run(
        ["packer", "build", "-machine-readable", str(template)],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"packer failed:\n{done.stdout[-3000:]}")
    return {}


def bound(model: Model, machine_work: float) -> float:
    """The critical path no tool can shorten: EC2's waits that must follow one another, plus the machine's work.

    Launch, stop, snapshot and image must happen in that order; shutting the builder down
    can overlap the snapshots (they hold the blocks as of their start), so it is not on it.
    """
    waits = model.instance_pending + model.instance_stopping + model.snapshot_pending + model.image_pending
    return round(waits + machine_work, 2)


def table(result: dict[str, Any]) -> str:
    """Return the results as the short markdown kept next to the JSON (bench/results/vs-packer.md)."""
    summary, lower = result["summary"], result["lower_bound_s"]
    ours_median = summary["ours"]["wall_s"]["median"]
    lines = [
        f"Lower bound (modelled waits on the critical path + the machine's work): {lower} s",
        "",
        f"Latency model (seconds): {json.dumps(result['model'])}",
        "",
        "| contender | wall median (min-max) | over the bound | vs ours | EC2 calls |",
        "|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        w = row["wall_s"]
        lines.append(
            f"| {name} | {w['median']} s ({w['min']}-{w['max']}) | {row['over_bound']}x | "
            f"{round(w['median'] / ours_median, 2)}x | {row['calls']} |"
        )
    return "\n".join(lines) + "\n"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scale", type=float, default=0.1, help="of the realistic latency preset")
    parser.add_argument("--rate", type=float, default=20, help="EC2 calls per second before throttling")
    parser.add_argument("--seed", type=int, default=new_seed(), help="of the latency model's draws (default: random)")
    parser.add_argument("--out", type=Path, default=PROJECT / "bench/results/vs-packer.json")
    return parser.parse_args()


def main() -> int:
    args = arguments()
    if not shutil.which("packer"):
        sys.exit("needs Debian's packer: apt-get install packer")
    model = Model.preset("realistic", args.scale, args.rate, args.seed)  # the seed is recorded: a run can be replayed
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        state = work / "sandbox"
        control.start(state, latency=("realistic", args.scale, args.rate), seed=args.seed)
        try:
            roles = work / "roles"
            roles.mkdir()
            shutil.copy(PROJECT / "roles/defaults.yaml", roles)
            (roles / "bench.yaml").write_text(yaml.safe_dump(ROLE))
            scripts = work / "scripts"
            scripts.mkdir()
            for script in render_role(load_role("bench", roles)):
                (scripts / script.name).write_text(script.text)
            template = work / "packer.json"
            template.write_text(json.dumps(packer_template(scripts)))
            # Our waits learn from earlier builds (builder.aws.waits.Waits): start from nothing, and
            # report the first build, made with nothing learnt, on its own row.
            env = {**os.environ, "EBSROLE_SANDBOX": str(state), "EBSROLE_WAITS": str(work / "waits.json")}
            results: dict[str, list[dict[str, Any]]] = {}
            wall, calls, extra = calls_during(state, lambda: ours(roles, env, work, 0))
            results[FIRST] = [{"wall_s": round(wall, 2), "calls": calls, **extra}]
            print(f"first build of ours: {wall:.1f} s, {sum(calls.values())} calls", file=sys.stderr)
            contenders = {
                "ours": lambda n: ours(roles, env, work, n),
                "packer (defaults: 15 s polls)": lambda n: packer(template, None, work, state),
                "packer (AWS_POLL_DELAY_SECONDS=1)": lambda n: packer(template, 1, work, state),
            }
            results.update({name: [] for name in contenders})
            for n in range(1, args.runs + 1):
                for name, run in contenders.items():
                    wall, calls, extra = calls_during(state, lambda r=run, k=n: r(k))
                    results[name].append({"wall_s": round(wall, 2), "calls": calls, **(extra or {})})
                    print(f"run {n}/{args.runs} {name}: {wall:.1f} s, {sum(calls.values())} calls", file=sys.stderr)
            throttled = control.status(state)["throttled"]
        finally:
            control.reset(state)
    work_s = statistics.median(r["machine_work_s"] for r in results["ours"])
    lower = bound(model, work_s)
    summary = {}
    for name, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        calls = [sum(r["calls"].values()) for r in runs]
        by_action: dict[str, int] = {}
        for action in sorted({a for r in runs for a in r["calls"]}):
            by_action[action] = round(statistics.median(r["calls"].get(action, 0) for r in runs))
        summary[name] = {
            "wall_s": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)},
            "over_bound": round(statistics.median(walls) / lower, 2),
            "calls": statistics.median(calls),
            "calls_by_action": by_action,
        }
    result = {
        "model": json.loads(model.to_json()),
        "scale": args.scale,
        "seed": args.seed,
        "runs": args.runs,
        "machine_work_s": work_s,
        "lower_bound_s": lower,
        "throttled_calls": throttled,
        "summary": summary,
        "raw": results,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(result))
    print(table(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
