#!/bin/bash
# The quick start: install what the tool needs, then build the web role's AMI end to end in
# the local sandbox (no AWS account): the Debian tree is prepared on first use, a local
# EC2 endpoint starts in the background, and the build runs through the same code as
# against AWS. Extra arguments go to build.py (e.g. -v to stream the scripts' output).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python build.py validate
.venv/bin/python build.py web --sandbox "$@"
