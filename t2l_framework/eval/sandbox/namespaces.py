"""The hand-written fallback where bwrap cannot run: ``unshare`` + mounts between fork and exec.

Network, pid and mount namespaces as the kernel allows (a user namespace when not root), a
private tmpfs over the world-writable scratch directories and a size-capped tmpfs work dir.
It does not remount ``/`` read-only nor mount a fresh ``/proc``: ``sandbox_info()`` says so, and
the per-program uid (as root) is then what keeps programs off other files and processes.
"""

from __future__ import annotations

import ctypes
import os
import shutil

# linux/sched.h, linux/mount.h
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 32, 4096, 16384, 1 << 18
_MS_RDONLY = 1

_LIBC = None


def libc():
    global _LIBC
    if _LIBC is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.unshare.argtypes = [ctypes.c_int]
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _LIBC = lib
    return _LIBC


def _ok(result: int, what: str):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write_proc(path: bytes, data: bytes):
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def unshare_wrapper() -> list[str] | None:
    """``unshare --fork --kill-child -- /bin/sh -c ...``: a shell as pid 1 of the namespace, so the
    program is an ordinary process (pid 1 ignores signals it has no handler for), and everything it
    started dies with the namespace."""
    unshare = shutil.which("unshare", path=os.environ.get("PATH", "") + os.pathsep + "/usr/bin:/bin:/usr/sbin:/sbin")
    if not unshare or not os.access("/bin/sh", os.X_OK):
        return None
    return [unshare, "--fork", "--kill-child", "--", "/bin/sh", "-c", '"$@"; exit $?', "t2l-sandbox"]


def isolate(ns_flags: int, userns: bool, mounts: bool, uid: int, gid: int, workdir: str, work_bytes: int,
            covers: list[tuple[str, str, list[str]]], files: list[str]):
    """A function for the child between fork and exec (everything computed here, in the parent):
    unshare, write the id maps, mount the covers, exposures and the work dir, copy ``files`` in."""
    lib = libc()
    uid_map, gid_map = f"{uid} {uid} 1".encode(), f"{gid} {gid} 1".encode()
    work_b = os.fsencode(workdir)
    work_opts = f"mode=0700,uid={uid},gid={gid},size={work_bytes >> 10}k,nr_inodes=4096".encode()
    cover_b = [(os.fsencode(d), opts.encode(), [os.fsencode(p) for p in exposed]) for d, opts, exposed in covers]
    file_list = [(os.fsencode(os.path.join(workdir, name)), os.fsencode(name)) for name in files]
    ro_flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV

    def run():
        if ns_flags:
            _ok(lib.unshare(ns_flags), "unshare")
            if userns:
                _write_proc(b"/proc/self/setgroups", b"deny")
                _write_proc(b"/proc/self/uid_map", uid_map)
                _write_proc(b"/proc/self/gid_map", gid_map)
        if not mounts:
            return
        _ok(lib.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
        sources = [(target, os.open(target, os.O_PATH | os.O_CLOEXEC)) for _, _, exposed in cover_b for target in exposed]
        contents = [(name, os.open(path, os.O_RDONLY | os.O_CLOEXEC)) for path, name in file_list]
        for cover, options, _ in cover_b:
            _ok(lib.mount(b"tmpfs", cover, b"tmpfs", _MS_NOSUID | _MS_NODEV, options), "mount tmpfs")
        for target, fd in sources:
            if os.path.isdir(b"/proc/self/fd/%d" % fd):
                os.makedirs(target, 0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
            _ok(lib.mount(b"/proc/self/fd/%d" % fd, target, None, _MS_BIND | _MS_REC, None), "bind")
            if not userns:
                _ok(lib.mount(None, target, None, ro_flags, None), "remount read-only")
            os.close(fd)
        os.makedirs(work_b, 0o755, exist_ok=True)
        _ok(lib.mount(b"tmpfs", work_b, b"tmpfs", _MS_NOSUID | _MS_NODEV, work_opts), "mount work dir")
        os.chdir(work_b)
        for name, fd in contents:
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            while chunk := os.read(fd, 1 << 16):
                while chunk:
                    chunk = chunk[os.write(out, chunk):]
            os.close(out)
            os.close(fd)

    return run
