#!/bin/bash
# Install what the tool needs, then run its main job on the shipped roles: validate
# them, audit what each puts on its volume, and render the web role's scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python build.py validate
.venv/bin/python build.py audit
.venv/bin/python build.py render web --out out/web
