"""Which host directories a sandboxed child sees differently: covers and read-only exposures.

World-writable scratch directories (``/tmp``, ``/var/tmp``, ``/dev/shm``) get a private tmpfs in
the child. When the child runs under another uid, directories it could not traverse (a Python
under ``/root``, mode 0700) are covered too, and the interpreter's own directories are
bind-mounted back read-only, so the child can start Python without seeing anything else there.
"""

from __future__ import annotations

import os
import site
import sys
import tempfile

STANDARD_COVERS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable: private tmpfs in the child


def ancestors(path: str) -> list[str]:
    out, current = [], path
    while True:
        parent = os.path.dirname(current)
        if parent == current:
            return out[::-1]
        out.append(parent)
        current = parent


def interpreter_paths() -> list[str]:
    """Directories the child interpreter reads: prefixes, site-packages, every hop of the executable's symlinks."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    try:
        paths.update(site.getsitepackages())
    except AttributeError:
        pass
    exe = sys.executable
    for _ in range(40):
        paths.add(os.path.dirname(exe))
        if not os.path.islink(exe):
            break
        exe = os.path.join(os.path.dirname(exe), os.readlink(exe))
    return sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)})


def covers(hide_unreachable: bool) -> list[tuple[str, str, list[str]]]:
    """(directory, tmpfs options, paths bind-mounted back) for the mount namespace."""
    standard = [d for d in STANDARD_COVERS if os.path.isdir(d) and os.path.realpath(d) == d]
    exposed: dict[str, set[str]] = {d: set() for d in standard}
    hidden: set[str] = set()
    tmpbase = os.path.realpath(tempfile.gettempdir())
    for path in interpreter_paths() + [tmpbase]:
        cover = next((d for d in standard if path == d or path.startswith(d + "/")), None)
        if cover is None and hide_unreachable:
            cover = next((a for a in ancestors(path) + [path] if a != "/"
                          and os.path.isdir(a) and not os.stat(a).st_mode & 0o001), None)
            if cover is not None:
                hidden.add(cover)
                exposed.setdefault(cover, set())
        if cover is not None and path != tmpbase:
            exposed[cover].add(path)
    out = []
    for cover, paths in sorted(exposed.items()):
        if cover in paths or any(cover.startswith(c + "/") for c in exposed if c != cover):
            continue  # covering it would hide what the interpreter needs / nested in another cover
        keep = sorted(p for p in paths if not any(p.startswith(q + "/") for q in paths if q != p))
        mode = "1777" if cover == "/dev/shm" else "0755"
        options = f"mode={mode},size={64 if cover in hidden else 1024}k,nr_inodes=1024"
        out.append((cover, options, keep))
    return out
