#!/usr/bin/env python3
"""Benchmark: `python build.py changed` for 100 roles against an endpoint holding 5,000 images.

The sandbox's EC2 endpoint (moto with the sandbox's fixes; in this process, on 127.0.0.1,
no machines needed) is filled with the Debian catalogue and 5,000 images of the tool:
half of the 100 roles have an AMI of their current fingerprint among them. Then
`build.py changed --format json` runs as a separate process, as CI runs it; the wall time
of the whole command and its EC2 calls are recorded, also for 10 roles, to show that the
calls do not grow with the number of roles.

Usage: .venv/bin/python bench/changed.py [--roles 100] [--images 5000] [--runs 5]
Writes bench/results/changed.json and prints a markdown table.
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

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
os.environ["MOTO_AMIS_PATH"] = str(PROJECT / "builder/sandbox/debian-amis.json")
for _name, _value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
    os.environ[_name] = _value

import logging  # noqa: E402
import threading  # noqa: E402

import yaml  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from builder.fingerprint import fingerprint  # noqa: E402
from builder.roles import load_roles  # noqa: E402
from builder.sandbox.auth import Credentials  # noqa: E402
from builder.sandbox.server import make_app  # noqa: E402

REGION = "eu-west-1"
BASE = "ami-000000000000000d2"


def make_roles(directory: Path, count: int) -> None:
    shutil.copy(PROJECT / "roles/defaults.yaml", directory)
    web = yaml.safe_load((PROJECT / "roles/web.yaml").read_text())
    for n in range(count):
        role = {**web, "externalize": [*web["externalize"], f"/srv/site{n}"]}
        (directory / f"role{n:03}.yaml").write_text(yaml.safe_dump(role))


def fill(backend: object, roles_dir: Path, images: int) -> None:
    """Register ``images`` tool AMIs straight into moto's backend; every other role gets its own."""
    roles = load_roles(None, roles_dir)
    current = {r.name: fingerprint(r, BASE).value for r in roles[::2]}
    names = list(current)
    for n in range(images):
        image = backend.register_image(name=f"ebsrole-bench-{n:05}", description="bench")  # type: ignore[attr-defined]
        role = names[n % len(names)] if n < len(names) else f"gone{n % 40}"
        value = current[role] if n < len(names) else f"{n:032x}"
        backend.create_tags(  # type: ignore[attr-defined]
            [image.id],
            {
                "ebsrole:role": role,
                "ebsrole:kind": "image",
                "ebsrole:status": "complete",
                "ebsrole:fingerprint": value,
                "ebsrole:build-id": f"20260101T000000Z-{n:08x}",
            },
        )


def run_changed(endpoint: str, roles_dir: Path, names: list[str]) -> tuple[float, dict[str, object]]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "build.py", "changed", *names, "--roles-dir", str(roles_dir), "--format", "json",
         "--endpoint-url", endpoint, "--region", REGION],
        cwd=PROJECT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"changed exited {done.returncode}: {done.stderr}")
    return wall, json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roles", type=int, default=100)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=PROJECT / "bench/results/changed.json")
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as work:
        # The endpoint answers only its own credentials; `changed` finds them in its environment.
        credentials = Credentials.generate()
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = credentials.pair()
        app = make_app(Path(work) / "sandbox", credentials)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        roles_dir = Path(work) / "roles"
        roles_dir.mkdir()
        make_roles(roles_dir, args.roles)
        started = time.monotonic()
        fill(app.backend(REGION), roles_dir, args.images)
        print(f"filled {args.images} images in {time.monotonic() - started:.1f} s", file=sys.stderr)
        run_changed(endpoint, roles_dir, [])  # moto's first answer is slow: not ours to count
        walls, result = [], {}
        for _ in range(args.runs):
            wall, result = run_changed(endpoint, roles_dir, [])
            walls.append(wall)
        few_wall, few = run_changed(endpoint, roles_dir, sorted(p.stem for p in roles_dir.glob("role00*.yaml")))
        server.shutdown()
    changed = result["changed"]
    assert isinstance(changed, list)
    out = {
        "roles": args.roles,
        "images_in_endpoint": args.images + 6,
        "runs": args.runs,
        "wall_s": {
            "median": round(statistics.median(walls), 3),
            "min": round(min(walls), 3),
            "max": round(max(walls), 3),
        },
        "changed_roles": len(changed),
        "api_calls": result["api_calls"],
        "api_calls_for_10_roles": few["api_calls"],
        "wall_s_for_10_roles": round(few_wall, 3),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"| `changed`, {args.roles} roles, {out['images_in_endpoint']} images | value |")
    print("|---|---|")
    print(f"| wall time, whole command (median of {args.runs}; min-max) | {out['wall_s']['median']} s "
          f"({out['wall_s']['min']}-{out['wall_s']['max']}) |")  # fmt: skip
    print(f"| roles reported changed | {len(changed)} of {args.roles} |")
    print(f"| EC2 calls, {args.roles} roles / 10 roles | {out['api_calls']} / {out['api_calls_for_10_roles']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
