"""ebsrole command line: python build.py --help."""

import gc
import sys

from builder.cli import main

if __name__ == "__main__":
    code = main()
    # Interpreter exit ends with a full garbage collection of every object (~0.15 s once
    # boto3 and paramiko are loaded), all about to go anyway: freezing them skips that scan.
    # Output is still flushed and atexit handlers still run.
    gc.freeze()
    sys.exit(code)
