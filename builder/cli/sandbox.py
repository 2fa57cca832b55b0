"""sandbox: start, show, stop or reset the local sandbox, or print the exports that point tools at it."""

from __future__ import annotations

import argparse

from builder.cli import output
from builder.cli.registry import Parser, add
from builder.errors import ExitCode


def add_parsers(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """Add the parser of sandbox."""
    p = add(sub, "sandbox", common)
    p.add_argument(
        "action",
        choices=("start", "status", "stop", "reset", "env", "capacity"),
        help="env: print the exports that point awscli, Terraform and Packer at it (its endpoint and credentials); "
        "capacity: show or change which instance types it refuses in which AZs",
    )
    p.add_argument(
        "--refuse",
        action="append",
        metavar="TYPE@AZ",
        help="capacity: RunInstances of TYPE in AZ fails with InsufficientInstanceCapacity (* for any; repeatable)",
    )
    p.add_argument(
        "--refuse-late",
        action="append",
        metavar="TYPE@AZ",
        help="capacity: such instances launch, then end terminated with Server.InsufficientInstanceCapacity",
    )
    p.add_argument("--clear", action="store_true", help="capacity: refuse nothing (before adding --refuse ones)")
    p.add_argument(
        "--release",
        action="append",
        choices=("bookworm", "trixie"),
        help="prepare this Debian tree at start (repeatable; default bookworm)",
    )
    p.add_argument(
        "--latency",
        choices=("none", "fixed", "realistic"),
        default="none",
        help="start: model EC2's waiting (transitional states that last; realistic: drawn around EC2's "
        "times, fixed: exactly them; default none: instant)",
    )
    p.add_argument("--latency-seed", type=int, help="start: seed of the model's draws (default: random, in status)")
    p.add_argument("--latency-scale", type=float, default=1.0, help="start: multiply the model's times (e.g. 0.1)")
    p.add_argument("--api-rate", type=float, default=0, help="start: throttle EC2 calls to this many a second")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Start, show, stop or reset the local sandbox; print the result."""
    from builder.sandbox import control

    json_out = args.format == "json"
    if args.action == "start":
        latency = (args.latency, args.latency_scale, args.api_rate)
        current = control.start(releases=tuple(args.release or ("bookworm",)), latency=latency, seed=args.latency_seed)
        doc: dict[str, object] = {"running": True, "endpoint": current.endpoint, "pid": current.pid}
        text = f"sandbox running: EC2 endpoint {current.endpoint} (pid {current.pid}, state {control.STATE_DIR})"
    elif args.action == "stop":
        was = control.stop()
        doc = {"running": False, "was_running": was}
        text = "sandbox stopped (state kept; reset deletes it)" if was else "sandbox was not running"
    elif args.action == "reset":
        control.reset()
        doc = {"running": False, "reset": True}
        text = f"sandbox reset: {control.STATE_DIR} removed"
    elif args.action == "capacity":
        from builder.sandbox import capacity

        refusals = capacity.update(control.STATE_DIR, args.refuse or [], args.refuse_late or [], clear=args.clear)
        doc = dict(refusals.to_dict())
        text = output.sandbox_capacity(refusals.to_dict())
    elif args.action == "env":
        output.emit(output.sandbox_env(control.env(), args.format))
        return ExitCode.OK
    else:
        doc = control.status()
        text = output.as_json(doc) if json_out else output.sandbox_status(doc)
    output.emit(output.as_json(doc) if json_out else text)
    return ExitCode.OK
