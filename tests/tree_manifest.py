#!/usr/bin/python3
"""Print a manifest of directory trees: everything a move must keep, one line per entry.

Runs on the machine under test (only the standard library and getfacl). For each entry
below each root: relative path, type, mode, owner, group, size, mtime (ns), sha256 of
the content or the symlink target, xattrs, ACL, and which earlier entry it is a hard
link of. Two manifests compare equal only when a copy kept all of that.
Usage: tree_manifest.py ROOT...   (a root that is a symlink is followed once)
"""

import hashlib
import os
import stat
import subprocess
import sys


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
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
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
            str(st.st_mtime_ns) if not stat.S_ISLNK(st.st_mode) else "",
            content(path, st),
            xattrs(path),
            acl(path) if not stat.S_ISLNK(st.st_mode) else "",
            link_of,
        ]
        print("\t".join(fields))


for arg in sys.argv[1:]:
    walk(arg)
