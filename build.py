"""ebsrole command line in a checkout: python build.py --help (installed: ebsrole --help)."""

import sys

from builder.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
