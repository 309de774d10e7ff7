"""Run model-generated Python (HumanEval / MBPP pass@1) in a child that cannot harm the evaluator or machine.

Layered, because each layer alone can be bypassed (``sandbox_info()`` says which are active here):

1. **Child process**: ``python -s -P -B`` (``-I`` without ``-E``, which would drop our
   ``PYTHONHASHSEED=0``; the environment is built from scratch anyway) in its own session, cwd a
   fresh temp dir (removed afterwards), nothing inherited from the environment, stdin closed,
   only an output tail kept; wall-clock timeout, then SIGKILL of everything it started.
2. **rlimits** (``preexec_fn``): memory (AS), CPU, file size, no core, processes (NPROC). NPROC
   counts every process of a uid and root ignores it, so a root evaluator runs the child as
   ``nobody`` (file permissions then protect root's files too); programs running at the same
   time share that budget. Plus NO_NEW_PRIVS and a parent-death SIGKILL.
3. **Namespaces** (probed once): *network* (no network even past the guard); *pid* (a shell is
   the namespace's init under ``unshare --fork --kill-child``: all the program started dies and
   is reaped with it, even processes that left its process group); *mount* (private /tmp,
   /var/tmp, /dev/shm, a size-capped tmpfs work dir, and read-only re-exposure of interpreter
   directories ``nobody`` cannot reach, e.g. a Python under /root, mode 0700).
4. **Python guard** run before the program: fork/exec/subprocess/multiprocessing, kill, setsid,
   sockets and writes outside the work dir raise PermissionError. It is bypassable (ctypes, gc,
   ``io.FileIO``): it gives readable errors for the common cases, layers 2-3 hold past it.

Not protected: this is no VM or container boundary (kernel exploits, side channels, reading
world-readable files, resources without an rlimit). Without root and without user namespaces
only layers 1, 2 (no uid drop) and 4 apply. For untrusted models at scale, run the evaluation in
a disposable container or VM that holds no credentials.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import resource
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = ["SandboxLimits", "ExecutionResult", "run_python", "run_many", "sandbox_info"]

OUTPUT_CHARS = 2000  # ExecutionResult.output keeps this many characters (the tail)
_PIPE_KEEP = 64 * 1024  # bytes of output kept while the program runs
_GUARD_FILE = "_t2l_guard.py"
_PROGRAM_FILE = "program.py"
_PROBE_TOKEN = "t2l-sandbox-probe-ok"
_STANDARD_COVERS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable: private tmpfs in the child
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"

# linux/sched.h, linux/mount.h, linux/prctl.h
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 32, 4096, 16384, 1 << 18
_MS_RDONLY = 1
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``max_processes``: processes/threads the program may create."""

    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # RLIMIT_AS of the child
    max_processes: int = 16  # RLIMIT_NPROC headroom (enforced where the kernel can)
    max_file_mb: int = 16  # RLIMIT_FSIZE; the work dir holds at most 4x this

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "max_processes", "max_file_mb"):
            value = getattr(self, name)
            integral = name != "timeout_s"
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or (integral and not isinstance(value, int)) or not math.isfinite(value) or value <= 0):
                kind = "a positive integer" if integral else "a positive, finite number of seconds"
                raise ValueError(f"SandboxLimits.{name} must be {kind}, got {value!r}")


@dataclass
class ExecutionResult:
    """status: ``passed`` (exit 0) | ``failed`` (non-zero exit, exception, signal) | ``timeout``.
    returncode: None on timeout (we killed it). output: tail of stdout+stderr."""

    status: str
    returncode: int | None
    duration_s: float
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --- the guard, run inside the child before the program -----------------------------------------

_GUARD_SOURCE = r'''
"""t2l sandbox guard (written by t2l_framework/eval/sandbox.py): runs the program after disabling
process creation, signals to other processes, the network, and writes outside the work dir."""
import builtins, errno, io, os, posix, sys, types


def _install():
    import _io, _posixsubprocess, _socket, multiprocessing.process, shutil, socket, subprocess

    root = os.path.realpath(os.getcwd())
    inside = root.rstrip(os.sep) + os.sep
    readlink, realpath = os.readlink, os.path.realpath
    os.environ["TMPDIR"] = root
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ.setdefault(var, "1")

    def where(path, dir_fd=None):
        if isinstance(path, int):
            return readlink("/proc/self/fd/%d" % path)
        path = os.fsdecode(os.fspath(path))
        if not os.path.isabs(path):
            base = readlink("/proc/self/fd/%d" % dir_fd) if dir_fd is not None else os.getcwd()
            path = os.path.join(base, path)
        return realpath(path)

    def check(path, dir_fd=None):
        try:
            real = where(path, dir_fd)
        except (OSError, TypeError, ValueError):
            real = None
        if real is None or not (real == root or real.startswith(inside)):
            shown = path if isinstance(path, (str, bytes, int)) else str(path)
            raise PermissionError(errno.EACCES, "sandbox: writing outside the working directory is not allowed",
                                  shown)

    def blocked(what):
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EPERM, "sandbox: %s is not allowed" % what)
        refuse.__name__ = refuse.__qualname__ = what.rsplit(".", 1)[-1]
        return refuse

    def replace(module, name, new):
        old = getattr(module, name, None)
        if old is None:
            return
        for support in ("supports_dir_fd", "supports_fd", "supports_follow_symlinks", "supports_effective_ids"):
            group = getattr(os, support, None)
            if group is not None and old in group:
                group.add(new)
        setattr(module, name, new)

    # processes and signals
    for name in ("fork", "forkpty", "system", "popen", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                 "execvp", "execvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setsid", "setpgrp",
                 "setpgid"):
        refuse = blocked("os." + name)
        replace(os, name, refuse)
        replace(posix, name, refuse)
    _posixsubprocess.fork_exec = blocked("subprocess")

    class Popen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise PermissionError(errno.EPERM, "sandbox: subprocess is not allowed")

        def __del__(self):
            pass

    subprocess.Popen = Popen
    multiprocessing.process.BaseProcess.start = blocked("multiprocessing")

    # network
    def guarded_socket(base):
        class Socket(base):
            def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
                if fileno is None:  # wrapping an existing fd (socketpair, fromfd) stays allowed
                    raise PermissionError(errno.EACCES, "sandbox: network access is not allowed")
                base.__init__(self, family, type, proto, fileno)  # not super(): socket.socket calls us
        Socket.__name__ = Socket.__qualname__ = base.__name__
        return Socket

    socket.socket = guarded_socket(socket.socket)
    _socket.socket = guarded_socket(_socket.socket)
    for module in (socket, _socket):
        for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                     "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, blocked("socket." + name))

    # writes outside the work dir
    real_open = builtins.open

    def open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and isinstance(mode, str) and any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    open.__doc__ = real_open.__doc__
    builtins.open = io.open = _io.open = open

    real_os_open = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & writing:
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    os_open.__name__ = "open"
    replace(os, "open", os_open)
    replace(posix, "open", os_open)

    def guard_paths(name, *specs):
        real = getattr(os, name, None)
        if real is None:
            return

        def wrapper(*args, **kwargs):
            for index, key, fd_key in specs:
                path = args[index] if len(args) > index else kwargs.get(key)
                if path is not None:
                    check(path, kwargs.get(fd_key) if fd_key else None)
            return real(*args, **kwargs)

        wrapper.__name__ = wrapper.__qualname__ = name
        wrapper.__doc__ = real.__doc__
        replace(os, name, wrapper)
        replace(posix, name, wrapper)

    for name in ("remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod", "truncate", "chmod", "chown", "lchown",
                 "utime", "setxattr", "removexattr"):
        guard_paths(name, (0, "path", "dir_fd"))
    for name in ("fchmod", "fchown"):
        guard_paths(name, (0, "fd", None))
    for name in ("rename", "replace", "link"):
        guard_paths(name, (0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd"))
    guard_paths("symlink", (1, "dst", "dir_fd"))

    real_rmtree, real_move = shutil.rmtree, shutil.move

    def rmtree(path, *args, **kwargs):
        check(path, kwargs.get("dir_fd"))
        return real_rmtree(path, *args, **kwargs)

    def move(src, dst, *args, **kwargs):
        check(src)
        check(dst)
        return real_move(src, dst, *args, **kwargs)

    rmtree.avoids_symlink_attacks = real_rmtree.avoids_symlink_attacks
    shutil.rmtree, shutil.move = rmtree, move


def _main():
    with open(sys.argv[1], "rb") as f:
        source = f.read()
    _install()
    main = types.ModuleType("__main__")
    main.__file__ = "program.py"
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv[:] = ["program.py"]
    sys.stdout.reconfigure(line_buffering=True)  # what was printed before a timeout is not lost
    try:
        exec(compile(source, "program.py", "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # print the traceback without the guard's own frames
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        sys.excepthook(type(exc), exc, tb)
        raise SystemExit(1)


_main()
'''


# --- libc bits used between fork and exec ---------------------------------------------------------

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare.argtypes = [ctypes.c_int]
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _LIBC = libc
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


# --- plan: which layers this machine allows (probed once) -----------------------------------------

@dataclass
class _Plan:
    name: str
    drop: tuple[int, int] | None  # (uid, gid) when root
    userns: bool  # not root: namespaces inside a user namespace mapping our own ids
    ns_flags: int
    wrapper: list[str]  # with a pid namespace: unshare --fork --kill-child -- /bin/sh -c ...
    mounts: bool
    covers: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (dir, tmpfs options, exposed)

    def describe(self) -> dict:
        ns = [n for flag, n in ((_CLONE_NEWUSER, "user"), (_CLONE_NEWNET, "network"), (_CLONE_NEWPID, "pid"),
                                (_CLONE_NEWNS, "mount")) if self.ns_flags & flag]
        return {"plan": self.name,
                "user": (f"uid {self.drop[0]} (dropped from root)" if self.drop else f"uid {os.getuid()} (own)"),
                "rlimits": ["AS", "CPU", "FSIZE", "CORE=0", "NPROC"], "namespaces": ns,
                "private_mounts": [c[0] for c in self.covers] + (["work dir (tmpfs)"] if self.mounts else []),
                "exposed_read_only": [p for c in self.covers for p in c[2]],
                "wrapper": " ".join(self.wrapper) or None, "guard": True}


_PLAN: _Plan | None = None
_PLAN_LOCK = threading.Lock()


def _nobody() -> tuple[int, int]:
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        return 65534, 65534


def _ancestors(path: str) -> list[str]:
    out, current = [], path
    while True:
        parent = os.path.dirname(current)
        if parent == current:
            return out[::-1]
        out.append(parent)
        current = parent


def _interpreter_paths() -> list[str]:
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


def _covers(hide_unreachable: bool) -> list[tuple[str, str, list[str]]]:
    """(directory, tmpfs options, paths bind-mounted back) for the mount namespace."""
    standard = [d for d in _STANDARD_COVERS if os.path.isdir(d) and os.path.realpath(d) == d]
    exposed: dict[str, set[str]] = {d: set() for d in standard}
    hidden: set[str] = set()
    tmpbase = os.path.realpath(tempfile.gettempdir())
    for path in _interpreter_paths() + [tmpbase]:
        cover = next((d for d in standard if path == d or path.startswith(d + "/")), None)
        if cover is None and hide_unreachable:
            cover = next((a for a in _ancestors(path) + [path] if a != "/"
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


def _candidates() -> list[_Plan]:
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/bin:/bin:/usr/sbin:/sbin"
    unshare = shutil.which("unshare", path=search)
    wrapper = [unshare, "--fork", "--kill-child", "--"] if unshare else None
    if wrapper and os.access("/bin/sh", os.X_OK):
        # a shell as pid 1 of the namespace, so the program is an ordinary process: pid 1 ignores every
        # signal it has no handler for (signal.alarm, abort, raise_signal would not end the program)
        wrapper += ["/bin/sh", "-c", '"$@"; exit $?', "t2l-sandbox"]
    root = os.geteuid() == 0
    drop = _nobody() if root else None
    user = 0 if root else _CLONE_NEWUSER
    covers = _covers(hide_unreachable=root)
    plans = []
    if wrapper:
        plans.append(_Plan("net+pid+mount", drop, not root, user | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID,
                           wrapper, True, covers))
    plans += [_Plan("net+mount", drop, not root, user | _CLONE_NEWNS | _CLONE_NEWNET, [], True, covers),
              _Plan("mount", drop, not root, user | _CLONE_NEWNS, [], True, covers),
              _Plan("no namespaces", drop, False, 0, [], False, [])]
    return plans


def _plan() -> _Plan:
    global _PLAN
    if _PLAN is not None:
        return _PLAN
    with _PLAN_LOCK:
        if _PLAN is None:
            if not sys.platform.startswith("linux"):
                raise RuntimeError("t2l sandbox: Linux only (needs /proc, rlimits and namespaces)")
            if not sys.executable:
                raise RuntimeError("t2l sandbox: sys.executable is unknown; cannot start a child interpreter")
            failures = []
            probe_limits = SandboxLimits(timeout_s=30.0)
            for plan in _candidates():
                try:
                    result = _execute(f"print({_PROBE_TOKEN!r})", probe_limits, plan)
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    failures.append(f"{plan.name}: {exc}")
                    continue
                if result.passed and _PROBE_TOKEN in result.output:
                    _PLAN = plan
                    break
                failures.append(f"{plan.name}: {result.status} rc={result.returncode} {result.output[-300:]!r}")
            else:
                hint = (" (as root the child runs as 'nobody': the interpreter and tempfile.gettempdir() must be"
                        " readable by it, or mount namespaces must be allowed)" if os.geteuid() == 0 else "")
                raise RuntimeError("t2l sandbox: no way to start a sandboxed interpreter on this machine" + hint
                                   + ":\n  " + "\n  ".join(failures))
    return _PLAN


def sandbox_info() -> dict:
    """The layers active on this machine (runs the one-time probe)."""
    return _plan().describe()


# --- running one program --------------------------------------------------------------------------

def _count_tasks(uid: int) -> int:
    """Tasks (processes + threads) whose real uid is ``uid``: what RLIMIT_NPROC counts."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        real_uid = threads = None
        for line in status.splitlines():
            if line.startswith(b"Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith(b"Threads:"):
                threads = int(line.split()[1])
        if real_uid == uid:
            total += threads or 1
    return total


def _make_preexec(plan: _Plan, limits: SandboxLimits, workdir: str, files: list[str]) -> Callable[[], None]:
    """Everything computed here, in the parent; the returned function runs between fork and exec."""
    libc = _libc()
    root = plan.drop is not None
    uid, gid = plan.drop if root else (os.getuid(), os.getgid())
    nproc = _count_tasks(uid) + 3 + limits.max_processes  # the interpreter, unshare and its shell
    cpu = math.ceil(limits.timeout_s) + 1
    fsize, memory = limits.max_file_mb << 20, limits.memory_mb << 20
    wanted = [(resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_FSIZE, fsize, fsize),
              (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_AS, memory, memory)]
    rlimits = []
    for res, soft, hard in wanted:
        if not root:  # cannot raise the hard limit
            current = resource.getrlimit(res)[1]
            if current != resource.RLIM_INFINITY:
                soft, hard = min(soft, current), min(hard, current)
        rlimits.append((res, (soft, hard)))
    *early, address_space = rlimits  # RLIMIT_AS last: the forked child still has the parent's address space
    uid_map, gid_map = f"{uid} {uid} 1".encode(), f"{gid} {gid} 1".encode()
    work_b = os.fsencode(workdir)
    work_opts = f"mode=0700,uid={uid},gid={gid},size={4 * limits.max_file_mb}m,nr_inodes=4096".encode()
    covers = [(os.fsencode(d), opts.encode(), [os.fsencode(p) for p in exposed]) for d, opts, exposed in plan.covers]
    file_list = [(os.fsencode(os.path.join(workdir, name)), os.fsencode(name)) for name in files]
    ro_flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV

    def preexec():
        try:
            for res, value in early:
                resource.setrlimit(res, value)
            if plan.ns_flags:
                _ok(libc.unshare(plan.ns_flags), "unshare")
                if plan.userns:
                    _write_proc(b"/proc/self/setgroups", b"deny")
                    _write_proc(b"/proc/self/uid_map", uid_map)
                    _write_proc(b"/proc/self/gid_map", gid_map)
            if plan.mounts:
                _ok(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
                sources = [(target, os.open(target, os.O_PATH | os.O_CLOEXEC))
                           for _, _, exposed in covers for target in exposed]
                contents = [(name, os.open(path, os.O_RDONLY | os.O_CLOEXEC)) for path, name in file_list]
                for cover, options, _ in covers:
                    _ok(libc.mount(b"tmpfs", cover, b"tmpfs", _MS_NOSUID | _MS_NODEV, options), "mount tmpfs")
                for target, fd in sources:
                    if os.path.isdir(b"/proc/self/fd/%d" % fd):
                        os.makedirs(target, 0o755, exist_ok=True)
                    else:
                        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                    _ok(libc.mount(b"/proc/self/fd/%d" % fd, target, None, _MS_BIND | _MS_REC, None), "bind")
                    if not plan.userns:
                        _ok(libc.mount(None, target, None, ro_flags, None), "remount read-only")
                    os.close(fd)
                os.makedirs(work_b, 0o755, exist_ok=True)
                _ok(libc.mount(b"tmpfs", work_b, b"tmpfs", _MS_NOSUID | _MS_NODEV, work_opts), "mount work dir")
                os.chdir(work_b)
                for name, fd in contents:
                    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
                    while chunk := os.read(fd, 1 << 16):
                        while chunk:
                            chunk = chunk[os.write(out, chunk):]
                    os.close(out)
                    os.close(fd)
            if root:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            resource.setrlimit(*address_space)
        except BaseException as exc:
            os.write(2, f"t2l sandbox setup failed: {exc!r}\n".encode())
            raise

    return preexec


def _read_available(fd: int, buf: bytearray, max_chunks: int = 16) -> bool:
    """Read what is there without blocking (at most ``max_chunks`` reads, so a program that writes
    faster than we read cannot keep us from the clock); False at end of file."""
    for _ in range(max_chunks):
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not chunk:
            return False
        buf += chunk
        if len(buf) > 2 * _PIPE_KEEP:
            del buf[:-_PIPE_KEEP]
    return True


def _exited(pid: int) -> bool:
    """Has ``pid`` terminated? Leaves it unreaped, so its pid (= the process group id) stays reserved."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        pass
    kids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _kill(pid: int, sig: int = signal.SIGKILL, group: bool = False):
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _spawn(argv, workdir, env, plan, limits, files, out_w, out_r):
    """Popen with our preexec; retries while the uid's process budget is momentarily exhausted (EAGAIN)."""
    deadline = time.monotonic() + limits.timeout_s + 5.0
    delay = 0.02
    while True:
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, cwd=workdir,
                                    env=env, start_new_session=True, close_fds=True,
                                    preexec_fn=_make_preexec(plan, limits, workdir, files))
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError("t2l sandbox: could not start the child (process limit reached: EAGAIN)")
            time.sleep(delay)
            delay = min(2 * delay, 0.5)
        except subprocess.SubprocessError as exc:
            buf = bytearray()
            _read_available(out_r, buf)
            detail = buf.decode("utf-8", "replace").strip() or str(exc)
            raise RuntimeError(f"t2l sandbox: {detail}") from None


def _remove_tree(path: str):
    def retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    for _ in range(3):
        if not os.path.lexists(path):
            return
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=retry)
        else:
            shutil.rmtree(path, onerror=retry)


def _signal_note(returncode: int, shell: bool) -> str:
    """``[t2l sandbox: ...]`` for a program ended by a signal (a shell reports it as 128 + signal)."""
    if returncode < 0:
        number, shown = -returncode, "{}"
    elif shell and returncode > 128:
        number, shown = returncode - 128, "128 + {}"
    else:
        return ""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return ""
    cpu = ", also how the CPU-time limit ends a program" if number == signal.SIGKILL else ""
    return f"[t2l sandbox: exit status {returncode} = {shown.format(name)}{cpu}]"


def _stop(proc: subprocess.Popen, plan: _Plan, out_r: int, buf: bytearray):
    """Kill everything the program started; returns once the leader has exited (not yet reaped)."""
    if plan.ns_flags & _CLONE_NEWPID:
        # kill the pid namespace's init: the kernel kills the rest and unshare reaps it all
        for child in _children(proc.pid):
            _kill(child)
        for _ in range(500):  # keep draining: unshare may still write to a full pipe
            if _exited(proc.pid):
                break
            _read_available(out_r, buf)
            time.sleep(0.01)
    _kill(proc.pid, group=True)


def _execute(program: str, limits: SandboxLimits, plan: _Plan) -> ExecutionResult:
    workdir = tempfile.mkdtemp(prefix="t2l-sandbox-")
    out_r = out_w = pidfd = proc = None
    try:
        for name, text, mode in ((_GUARD_FILE, _GUARD_SOURCE, 0o444), (_PROGRAM_FILE, program, 0o444)):
            path = os.path.join(workdir, name)
            with open(path, "wb") as f:
                f.write(text.encode("utf-8", "surrogatepass"))
            os.chmod(path, mode)
        if plan.drop:
            os.chown(workdir, *plan.drop)
        env = {"PATH": _SAFE_PATH, "HOME": workdir, "LANG": os.environ.get("LANG") or "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        flags = ["-s", "-P", "-B"] if sys.version_info >= (3, 11) else ["-s", "-B"]
        argv = plan.wrapper + [sys.executable, *flags, os.path.join(workdir, _GUARD_FILE),
                               os.path.join(workdir, _PROGRAM_FILE)]
        out_r, out_w = os.pipe()
        os.set_blocking(out_r, False)
        start = time.perf_counter()
        proc = _spawn(argv, workdir, env, plan, limits, [_GUARD_FILE, _PROGRAM_FILE], out_w, out_r)
        os.close(out_w)
        out_w = None
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        buf, reading, timed_out = bytearray(), True, False
        deadline = start + limits.timeout_s
        while not _exited(proc.pid):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                timed_out = True
                break
            watch = ([out_r] if reading else []) + ([pidfd] if pidfd is not None else [])
            wait = remaining if pidfd is not None else min(remaining, 0.01)
            ready = select.select(watch, [], [], wait)[0] if watch else time.sleep(wait) or []
            if out_r in ready:
                reading = _read_available(out_r, buf)
        duration = time.perf_counter() - start
        if timed_out:
            _stop(proc, plan, out_r, buf)
        _read_available(out_r, buf)
        _kill(proc.pid, group=True)  # leftovers; the leader is unreaped, so the group id cannot be reused
        returncode = proc.wait()
        _read_available(out_r, buf)
        # unshare re-raises the signal that ended the program and complains that SIGKILL cannot be unblocked
        output = buf.decode("utf-8", "replace")
        output = output.replace("unshare: sigprocmask unblock failed: Invalid argument\n", "")
        if timed_out:
            note = f"[t2l sandbox: killed after {limits.timeout_s:g} s]"
        else:
            note = _signal_note(returncode, shell=plan.wrapper[-4:-3] == ["/bin/sh"])
        output = (output[-(OUTPUT_CHARS - len(note)):] + note) if note else output[-OUTPUT_CHARS:]
        if timed_out:
            return ExecutionResult("timeout", None, duration, output)
        return ExecutionResult("passed" if returncode == 0 else "failed", returncode, duration, output)
    finally:
        if proc is not None and proc.returncode is None:  # interrupted (e.g. KeyboardInterrupt) mid-run
            _stop(proc, plan, out_r, bytearray())
            proc.wait()
        for fd in (out_r, out_w, pidfd):
            if fd is not None:
                os.close(fd)
        _remove_tree(workdir)


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run ``program`` (Python source) in the sandbox. Never raises because of the program."""
    if not isinstance(program, str):
        raise TypeError(f"run_python: program must be str, got {type(program).__name__}")
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"run_python: limits must be SandboxLimits, got {type(limits).__name__}")
    return _execute(program, limits, _plan())


def run_many(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None,
             progress: Callable[[int], None] | None = None) -> list[ExecutionResult]:
    """``run_python`` over ``programs`` in a thread pool; results in input order. ``progress(n_done)``
    is called from the calling thread after each program."""
    programs = list(programs)
    for i, program in enumerate(programs):
        if not isinstance(program, str):
            raise TypeError(f"run_many: programs[{i}] must be str, got {type(program).__name__}")
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"run_many: limits must be SandboxLimits, got {type(limits).__name__}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"run_many: workers must be a positive integer or None, got {workers!r}")
    if not programs:
        return []
    plan = _plan()
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    results: list[ExecutionResult | None] = [None] * len(programs)
    pool = ThreadPoolExecutor(max_workers=min(workers, len(programs)), thread_name_prefix="t2l-sandbox")
    try:
        futures = {pool.submit(_execute, program, limits, plan): i for i, program in enumerate(programs)}
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress is not None:
                progress(done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results
