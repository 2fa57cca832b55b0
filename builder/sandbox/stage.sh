#!/bin/bash
# The part of a local machine's start that runs inside its new namespaces; started by
# builder/sandbox/machine.py through unshare. Three stages:
#   stage.sh host   real root, in a private mount namespace of its own: makes the machine's
#                   user namespace (uid/gid 0-65535 inside are BASE.. on the host), gives it
#                   the root tree's layers and the writable layer as idmapped binds, makes its
#                   /dev (a tmpfs of the host's: device nodes work there and only there), then
#                   enters the user namespace and unshares the others (owned by it)
#   stage.sh ns     PID 1 of the new pid namespace, root of the user namespace only: joins
#                   the payload cgroup (delegated to it) and re-executes itself in a new
#                   cgroup namespace rooted there
#   stage.sh root   builds the machine's root (overlay of the idmapped layers, /proc, a
#                   read-only /sys, a cgroup2 view, the /dev made by the host), waits for the
#                   host to wire the network, then pivots into it and executes systemd with a
#                   reduced capability set (capabilities of the user namespace only).
# Environment: STATE (machine state dir), LOWER (root tree layers, topmost first, ":"),
# HELPERS (host-made layer above them), NAME, CGROUP (payload cgroup2 dir on the host),
# CAPS (setpriv bounding set), DISKS ("node:maj:min:byid:uuid ..."), BASE (first host uid
# and gid of the machine), BROKER (python command of builder.sandbox.broker).
set -euo pipefail

stage_host() {
  local holder i layer lowers=() dev=$STATE/map/dev
  mount --make-rprivate /
  # The VPCs' named network namespaces (/run/netns, see vpcnet.py) must not be held alive by
  # this copy of the host's mounts once the sandbox removes them.
  if mountpoint -q /run/netns; then umount -l /run/netns; fi
  # The user namespace, made by a holder process and mapped from here (util-linux's
  # --map-users needs newuidmap); kept open on fd 9 while the namespaces are made.
  unshare --user -- sleep 60 &
  holder=$!
  while [[ $(readlink "/proc/$holder/ns/user") == "$(readlink /proc/self/ns/user)" ]]; do sleep 0.002; done
  echo "0 $BASE 65536" >"/proc/$holder/uid_map"
  echo "0 $BASE 65536" >"/proc/$holder/gid_map"
  exec 9<"/proc/$holder/ns/user"
  kill "$holder"
  wait "$holder" 2>/dev/null || true
  mkdir -p "$STATE/map/rw" "$dev" "$STATE/rw/upper" "$STATE/rw/work"
  local binds=("$STATE/rw" "$STATE/map/rw") i=0
  IFS=: read -r -a layers <<<"$HELPERS:$LOWER"
  for layer in "${layers[@]}"; do
    mkdir -p "$STATE/map/l$i"
    binds+=("$layer" "$STATE/map/l$i")
    lowers+=("map/l$i")
    i=$((i + 1))
  done
  if ((BASE == 0)); then
    # A host_root machine (tests): uids are not shifted, so the host mounts the overlay
    # itself over the plain layers. It writes its upper layer with the host's credentials,
    # which an overlay mounted inside the user namespace cannot (security.* xattrs, device
    # nodes made by the host's root through Machine.exec); root inside is still held to its
    # own capabilities, which the overlay checks first.
    mount -t overlay overlay -o "lowerdir=$HELPERS:$LOWER,upperdir=$STATE/rw/upper,workdir=$STATE/rw/work" \
      "$STATE/root"
  else
    $BROKER bind /proc/self/fd/9 "${binds[@]}"
  fi
  make_dev "$dev"
  export LOWER_MAPPED
  LOWER_MAPPED=$(IFS=:; echo "${lowers[*]}")
  # Inside, paths are relative to the state directory: its parents may be closed to the
  # machine's root (a 0700 temporary directory), and so may this script's checkout.
  cp "$0" "$STATE/stage.sh"
  cd "$STATE"
  exec nsenter --user=/proc/self/fd/9 -- unshare --mount --pid --uts --ipc --net --fork --kill-child -- \
    bash ./stage.sh ns
}

stage_ns() {
  exec 9<&-
  echo 0 >"$CGROUP/cgroup.procs"
  exec unshare --cgroup -- bash ./stage.sh root
}

make_dev() {
  local dev=$1 spec node maj min byid uuid
  mount -t tmpfs -o "mode=755,size=4m,nosuid,noexec,uid=$BASE,gid=$BASE" tmpfs "$dev"
  mknod -m 666 "$dev/null" c 1 3
  mknod -m 666 "$dev/zero" c 1 5
  mknod -m 666 "$dev/full" c 1 7
  mknod -m 666 "$dev/random" c 1 8
  mknod -m 666 "$dev/urandom" c 1 9
  mknod -m 666 "$dev/tty" c 5 0
  mkdir -m 755 "$dev/pts" "$dev/net" "$dev/disk" "$dev/disk/by-id"
  mkdir -m 1777 "$dev/shm"
  mknod -m 666 "$dev/net/tun" c 10 200
  ln -s pts/ptmx "$dev/ptmx"
  ln -s /proc/self/fd "$dev/fd"
  ln -s /proc/self/fd/0 "$dev/stdin"
  ln -s /proc/self/fd/1 "$dev/stdout"
  ln -s /proc/self/fd/2 "$dev/stderr"
  # The console is the pty that `script` gives the machine: its output is console.log.
  touch "$dev/console"
  if tty -s; then
    chown "$BASE:$((BASE + 5))" "$(tty)"
    mount --bind "$(tty)" "$dev/console"
  else
    mount --bind /dev/null "$dev/console"
  fi
  # The broker's socket: how the machine asks the host to mount or freeze its volumes.
  touch "$dev/.ebsrole-broker"
  mount --bind "$STATE/broker.sock" "$dev/.ebsrole-broker"
  chown "$BASE:$BASE" "$dev/pts" "$dev/net" "$dev/disk" "$dev/disk/by-id" "$dev/shm" "$STATE/broker.sock"
  for spec in ${DISKS:-}; do
    IFS=: read -r node maj min byid uuid <<<"$spec"
    mknod -m 660 "$dev/$node" b "$maj" "$min"
    chown "$BASE:$((BASE + 6))" "$dev/$node"
    if [[ -n $byid ]]; then ln -sf "../../$node" "$dev/disk/by-id/$byid"; fi
    if [[ -n $uuid ]]; then mkdir -p "$dev/disk/by-uuid" && ln -sf "../../$node" "$dev/disk/by-uuid/$uuid"; fi
    chown -hR "$BASE:$BASE" "$dev/disk"/*
  done
}

# systemd's fstab generator ignores device lines (UUID=..., /dev/...) in a container, so a
# volume listed in /etc/fstab would never be mounted at boot, unlike on an EC2 instance. This
# generator, on the machine's /run (not on its disk, so never in a snapshot or an image), does
# for those lines what the stock generator does on a VM: a mount unit, wanted (nofail) or
# required by local-fs.target.
install_fstab_generator() {
  local dir=$1
  mkdir -p "$dir"
  cat >"$dir/ebsrole-fstab-devices" <<'GENERATOR'
#!/bin/bash
out=${1:?}
while read -r what where type options _; do
  case $what in UUID=* | LABEL=* | PARTUUID=* | PARTLABEL=* | /dev/*) ;; *) continue ;; esac
  [[ $where == / || $type == swap || $where != /* ]] && continue
  case $what in
    UUID=*) dev=/dev/disk/by-uuid/${what#UUID=} ;;
    LABEL=*) dev=/dev/disk/by-label/${what#LABEL=} ;;
    PARTUUID=*) dev=/dev/disk/by-partuuid/${what#PARTUUID=} ;;
    PARTLABEL=*) dev=/dev/disk/by-partlabel/${what#PARTLABEL=} ;;
    *) dev=$what ;;
  esac
  unit=$(systemd-escape --path --suffix=mount "$where")
  [[ -e $out/$unit ]] && continue
  printf '[Unit]\nSourcePath=/etc/fstab\nBefore=local-fs.target\n\n[Mount]\nWhat=%s\nWhere=%s\nType=%s\nOptions=%s\n' \
    "$dev" "$where" "$type" "${options:-defaults}" >"$out/$unit"
  if [[ ,$options, == *,nofail,* ]]; then wants=local-fs.target.wants; else wants=local-fs.target.requires; fi
  mkdir -p "$out/$wants"
  ln -sf "../$unit" "$out/$wants/$unit"
done < <(grep -v '^[[:space:]]*#' /etc/fstab 2>/dev/null)
GENERATOR
  chmod 755 "$dir/ebsrole-fstab-devices"
}

stage_root() {
  local root=root rw=map/rw
  mount --make-rprivate /
  if mountpoint -q "$root"; then
    # The host's overlay (host_root) is locked here, and pivot_root refuses a locked mount.
    mount --bind "$root" "$root"
  else
    mount -t overlay overlay -o "userxattr,lowerdir=$LOWER_MAPPED,upperdir=$rw/upper,workdir=$rw/work" "$root"
  fi
  mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
  # /proc/sys read-only, except the per-network-namespace net.* that networking needs.
  mount --bind "$root/proc/sys" "$root/proc/sys"
  mount --bind "$root/proc/sys/net" "$root/proc/sys/net"
  mount -o remount,bind,ro "$root/proc/sys"
  if [[ -e $root/proc/sysrq-trigger ]]; then
    mount --bind "$root/proc/sysrq-trigger" "$root/proc/sysrq-trigger"
    mount -o remount,bind,ro "$root/proc/sysrq-trigger"
  fi
  mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
  mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"
  mount --rbind map/dev "$root/dev"
  mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec devpts "$root/dev/pts"
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
  mount -t tmpfs -o mode=755,size=256m,nosuid,nodev tmpfs "$root/run"
  mount -t tmpfs -o mode=1777,size=1g,nosuid,nodev tmpfs "$root/tmp"
  install_fstab_generator "$root/run/systemd/system-generators"
  hostname "$NAME"
  read -r _ <go
  cd "$root"
  pivot_root . .
  umount -l .
  cd /
  # systemd does not do this in a container; without it a mount made later (the data
  # volume) never reaches services that run in their own mount namespace.
  mount --make-rshared /
  exec env -i container=ebsrole TERM=linux \
    setpriv --bounding-set "$CAPS" --inh-caps=-all /lib/systemd/systemd --log-target=journal-or-kmsg
}

case ${1:-} in
  host) stage_host ;;
  ns) stage_ns ;;
  root) stage_root ;;
  *) echo "usage: stage.sh host|ns|root" >&2; exit 2 ;;
esac
