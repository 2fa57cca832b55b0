"""The installed ``ebsrole`` command and ``python -m builder``: what the checkout's build.py runs."""

import gc
import sys

from builder import cli


def main() -> int:
    """Run the command line in sys.argv and return its exit code (130 after Ctrl-C)."""
    code = cli.main()
    # Interpreter exit ends with a full garbage collection of every object (~0.15 s once
    # boto3 and paramiko are loaded), all about to go anyway: freezing them skips that scan.
    # Output is still flushed and atexit handlers still run.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
