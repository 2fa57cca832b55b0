"""The command line: parse arguments, set up logging, run a command, map errors to exit codes.

The only package that prints to the terminal on its own account, reads argv or decides the
process's exit code. ``registry`` is the command table; each command group's module adds its
parsers and runs them; ``output`` renders every result. Heavy modules (boto3, paramiko,
jinja2) are imported inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from builder.cli.registry import GROUPS, VALUELESS_GLOBALS, VERBS, Parser, common, prog
from builder.errors import BuildError, ExitCode, RoleInvalid, Terminated, exit_code_help


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default sys.argv[1:]) and return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    # Ctrl-C must always reach the cleanup: a shell that starts this in the background
    # hands it SIGINT ignored, and Python then never raises KeyboardInterrupt.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            args = parse(args_list)
        except SystemExit as exc:
            # argparse exits after --help/--version (0) or a usage error it printed (2).
            return int(exc.code or 0)
        _configure_logging(args.debug, args.verbose)
        result: int = args.run(args)
        return result
    except BaseException as exc:  # noqa: BLE001 - every outcome becomes an exit code here, and only here
        return _exit_code(exc, debug)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _exit_code(exc: BaseException, debug: bool) -> int:
    """Report ``exc`` in one line (a traceback only with --debug); return its exit code (ExitCode)."""
    if isinstance(exc, RoleInvalid):
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, BuildError):
        print(f"error: {exc.render()}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    if isinstance(exc, Terminated):
        print("terminated", file=sys.stderr)
        return ExitCode.TERMINATED
    if isinstance(exc, BrokenPipeError):
        # stdout closed early (e.g. piped into head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    if not isinstance(exc, Exception):
        raise exc  # SystemExit and the like are not ours to map
    if debug:
        traceback.print_exc()
    print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
    return ExitCode.FAILED


def _raise_terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated


def _configure_logging(debug: bool, verbose: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s" if debug else "%(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    from builder.redact import RedactSecrets

    for handler in logging.getLogger().handlers:  # --debug logs botocore's bodies: user-data holds a key
        handler.addFilter(RedactSecrets())
    if not debug:
        # Third-party chatter (botocore, paramiko) only under --debug.
        for noisy in ("botocore", "boto3", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # paramiko logs every refused connection while a machine boots as an ERROR;
        # remote.py retries those and reports what matters itself.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("builder.remote.output").setLevel(logging.INFO if verbose or debug else logging.WARNING)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Return the parsed ``argv``: a command of the table, or else a build. argparse exits on bad usage (2)."""
    first = next((a for a in argv if a not in VALUELESS_GLOBALS), None)
    if first in VERBS:
        return _command_parser().parse_args(argv)
    from builder.cli import build

    return build.parser(common()).parse_args(argv)


def _command_parser() -> Parser:
    """Return the parser of the commands: each group module adds its own."""
    parent = common()
    parser = Parser(
        prog=prog(),
        description="ebsrole: role AMIs whose dynamic data lives on EBS.",
        epilog=exit_code_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)
    for group in GROUPS:
        importlib.import_module(f"builder.cli.{group}").add_parsers(sub, parent)
    return parser
