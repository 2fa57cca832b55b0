#!/usr/bin/python3
"""Print a manifest of directory trees: everything a move must keep, one line per entry.

Runs on the machine under test (only the standard library and getfacl). For each entry
below each root: relative path, type, mode, owner, group, size, mtime (ns, symlinks' own
too), sha256 of the content, the symlink target or a device's major:minor, xattrs (with
security.capability, i.e. file capabilities), ACL, which earlier entry it is a hard link
of, its chattr flags (lsattr letters) and, for a file with holes, where its data is.
Two manifests compare equal only when a copy kept all of that.
Usage: tree_manifest.py ROOT...   (a root that is a symlink is followed once)
"""

import fcntl
import hashlib
import os
import stat
import subprocess
import sys

# lsattr's letters for the flags a user sets with chattr (linux/fs.h FS_*_FL); the
# filesystem's own (extents, inline data, ...) differ between filesystems and are left out.
FLAGS = {"s": 0x1, "u": 0x2, "S": 0x8, "i": 0x10, "a": 0x20, "d": 0x40, "A": 0x80, "D": 0x10000, "C": 0x800000}
FS_IOC_GETFLAGS = 0x80086601


def flags(path, st):
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return ""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        value = int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))[:4], "little")
    except OSError:
        return "?"
    finally:
        os.close(fd)
    return "".join(letter for letter, bit in FLAGS.items() if value & bit)


def has_holes(st):
    return stat.S_ISREG(st.st_mode) and st.st_blocks * 512 < st.st_size


def data_extents(path, size):
    """Return the (start, end) byte ranges of a file that hold data (SEEK_DATA/SEEK_HOLE)."""
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here on
                break
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, offset))
    finally:
        os.close(fd)
    return extents


def data_map(path, st):
    """Return where a file with holes has its data ("holes:start-end,..."), "" otherwise."""
    if not has_holes(st):
        return ""
    return "holes:" + ",".join(f"{start}-{end}" for start, end in data_extents(path, st.st_size))


def acl(path):
    done = subprocess.run(["getfacl", "-cpsn", "--", path], capture_output=True, text=True, check=False)
    return done.stdout.strip().replace("\n", ",") if done.returncode == 0 else "?"


def xattrs(path):
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:
        return "?"
    values = []
    for name in names:
        if name == "system.posix_acl_access" or name == "system.posix_acl_default":
            continue  # reported by getfacl
        values.append(f"{name}={os.getxattr(path, name, follow_symlinks=False).hex()}")
    return ";".join(values)


def content(path, st):
    if stat.S_ISLNK(st.st_mode):
        return "->" + os.readlink(path)
    if stat.S_ISREG(st.st_mode):
        # A file with holes: its data extents only (the rest reads as zeros and data_map
        # says where it is), so a sparse 1 GiB file costs what its data costs.
        extents = data_extents(path, st.st_size) if has_holes(st) else [(0, st.st_size)]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for start, end in extents:
                handle.seek(start)
                digest.update(f"{start}:".encode())
                position = start
                while position < end:
                    block = handle.read(min(1 << 20, end - position))
                    if not block:
                        break
                    digest.update(block)
                    position += len(block)
        return digest.hexdigest()
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return ""


def walk(root):
    top = os.path.realpath(root)
    inodes = {}
    entries = [top]
    for base, dirs, files in os.walk(top):
        dirs.sort()
        entries.extend(os.path.join(base, name) for name in sorted(dirs + files))
    for path in entries:
        st = os.lstat(path)
        rel = os.path.relpath(path, top)
        link_of = ""
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            link_of = inodes.setdefault((st.st_dev, st.st_ino), rel)
            link_of = "" if link_of == rel else link_of
        fields = [
            f"{root}/{rel}",
            stat.filemode(st.st_mode),
            str(st.st_uid),
            str(st.st_gid),
            str(st.st_size if not stat.S_ISDIR(st.st_mode) else 0),
            str(st.st_mtime_ns),
            content(path, st),
            xattrs(path),
            acl(path) if not stat.S_ISLNK(st.st_mode) else "",
            link_of,
            flags(path, st),
            data_map(path, st),
        ]
        print("\t".join(fields))


for arg in sys.argv[1:]:
    walk(arg)
