#!/bin/bash
# Install what the project needs on a Debian 12 machine: Debian packages (as root) and
# a virtualenv in .venv with the Python packages. Safe to run again; fast when done.
# Usage: scripts/setup.sh [--dev]    (--dev adds the test and lint tools)
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-venv for .venv; debootstrap, slirp4netns and util-linux/mount for the local
# Debian machines (builder/sandbox), iproute2 for their VPC bridges; xfsprogs for the host's broker, which makes xfs on a
# machine's volume (mkfs.xfs needs the host's CAP_SYS_ADMIN); qemu for the boot check of
# provisioned roots.
DEBIAN_PACKAGES=(python3 python3-venv rsync acl attr debootstrap slirp4netns util-linux mount
  iproute2 e2fsprogs xfsprogs qemu-system-x86)
# The tests also drive Debian's Packer (1.6.6) against the sandbox, as another EC2 client.
[[ ${1:-} == --dev ]] && DEBIAN_PACKAGES+=(packer)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if ((EUID != 0)); then
    echo "setup: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 7
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
requirements=requirements.txt
[[ ${1:-} == --dev ]] && requirements=requirements-dev.txt
stamp=".venv/.installed-$(sha256sum "$requirements" requirements.txt | sha256sum | cut -c1-16)"
if [[ ! -e $stamp ]]; then
  echo "setup: installing Python packages from $requirements"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
  touch "$stamp"
fi
