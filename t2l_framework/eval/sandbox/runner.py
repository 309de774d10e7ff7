"""Running one program: spawn the isolated child, read a bounded output tail, enforce the wall
clock, kill everything it started, clean up; ``run_python`` / ``run_many`` on top."""

from __future__ import annotations

import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

from t2l_framework.eval.sandbox import bwrap, namespaces, seccomp
from t2l_framework.eval.sandbox.limits import OUTPUT_CHARS, ExecutionResult, SandboxLimits
from t2l_framework.eval.sandbox.plans import Plan, UidPool, candidates

_PIPE_KEEP = 64 * 1024  # bytes of output kept while the program runs
_GUARD_FILE = "_t2l_guard.py"
_PROGRAM_FILE = "program.py"
_GUARD_SOURCE = (Path(__file__).parent / "guard.py").read_bytes()
_PROBE_TOKEN = "t2l-sandbox-probe-ok"
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_NOFILE = 256

_PLAN: Plan | None = None
_PLAN_LOCK = threading.Lock()
_UIDS: UidPool | None = None


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



def _preexec(plan: Plan, limits: SandboxLimits, workdir: str, files: list[str], uid: int) -> Callable[[], None]:
    """The function run between fork and exec; everything is computed here, in the parent."""
    lib = namespaces.libc()
    root = plan.root
    nproc = _count_tasks(uid) + 3 + limits.max_processes  # the interpreter and its wrapper processes
    cpu = math.ceil(limits.timeout_s) + 1
    fsize, memory = limits.max_file_mb << 20, limits.memory_mb << 20
    wanted = [(resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_FSIZE, fsize, fsize),
              (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_NOFILE, _NOFILE, _NOFILE),
              (resource.RLIMIT_MSGQUEUE, 0, 0), (resource.RLIMIT_AS, memory, memory)]
    rlimits = []
    for res, soft, hard in wanted:
        if not root:  # cannot raise the hard limit
            current = resource.getrlimit(res)[1]
            if current != resource.RLIM_INFINITY:
                soft, hard = min(soft, current), min(hard, current)
        rlimits.append((res, (soft, hard)))
    *early, address_space = rlimits  # RLIMIT_AS last: the forked child still has the parent's address space
    hand_written = plan.kind == "namespaces"
    isolate = (namespaces.isolate(plan.ns_flags, plan.userns, plan.mounts, uid, uid, workdir, limits.work_dir_bytes,
                                  plan.covers, files) if hand_written else None)
    filter_in = seccomp.installer(plan.seccomp) if hand_written and plan.seccomp else None

    def preexec():
        try:
            for res, value in early:
                resource.setrlimit(res, value)
            if isolate is not None:
                isolate()
                if root:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
            lib.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            if filter_in is not None:
                filter_in()
            lib.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
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


def _spawn(argv, workdir, env, preexec, limits, out_w, out_r, pass_fds):
    """Popen with our preexec; retries while the uid's process budget is momentarily exhausted (EAGAIN)."""
    deadline = time.monotonic() + limits.timeout_s + 5.0
    delay = 0.02
    while True:
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, cwd=workdir,
                                    env=env, start_new_session=True, close_fds=True, pass_fds=pass_fds,
                                    preexec_fn=preexec)
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


def _stop(proc: subprocess.Popen, plan: Plan, out_r: int, buf: bytearray):
    """Kill everything the program started; returns once the leader has exited (not yet reaped)."""
    if plan.kind == "namespaces" and plan.ns_flags & namespaces.CLONE_NEWPID:
        # kill the pid namespace's init: the kernel kills the rest and unshare reaps it all
        for child in _children(proc.pid):
            _kill(child)
        for _ in range(500):  # keep draining: unshare may still write to a full pipe
            if _exited(proc.pid):
                break
            _read_available(out_r, buf)
            time.sleep(0.01)
    # bwrap: its init dies with it (--die-with-parent), and the pid namespace with its init
    _kill(proc.pid)
    _kill(proc.pid, group=True)


def _command(plan: Plan, limits: SandboxLimits, workdir: str, uid: int, fds: dict[str, int],
             seccomp_fd: int | None) -> list[str]:
    flags = ["-s", "-P", "-B"] if sys.version_info >= (3, 11) else ["-s", "-B"]
    python = [sys.executable, *flags, os.path.join(workdir, _GUARD_FILE), os.path.join(workdir, _PROGRAM_FILE)]
    if plan.kind == "bwrap":
        return bwrap.argv(plan.bwrap, limits, workdir, fds, seccomp_fd, plan.covers, uid if plan.root else None,
                          plan.setpriv) + python
    return plan.wrapper + python


def _execute(program: str, limits: SandboxLimits, plan: Plan) -> ExecutionResult:
    workdir = tempfile.mkdtemp(prefix="t2l-sandbox-")
    uid = _uids().acquire() if plan.root else os.getuid()
    out_r = out_w = pidfd = proc = sec_r = None
    fds: dict[str, int] = {}
    try:
        for name, data in ((_GUARD_FILE, _GUARD_SOURCE), (_PROGRAM_FILE, program.encode("utf-8", "surrogatepass"))):
            path = os.path.join(workdir, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o444)
            if plan.kind == "bwrap":
                fds[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if plan.root and plan.kind == "namespaces":
            os.chown(workdir, uid, uid)
        if plan.kind == "bwrap" and plan.seccomp:
            sec_r, sec_w = os.pipe()
            os.write(sec_w, plan.seccomp)  # a few hundred bytes: fits the pipe
            os.close(sec_w)
        env = {"PATH": _SAFE_PATH, "HOME": workdir, "LANG": os.environ.get("LANG") or "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        argv = _command(plan, limits, workdir, uid, fds, sec_r)
        out_r, out_w = os.pipe()
        os.set_blocking(out_r, False)
        start = time.perf_counter()
        pass_fds = tuple(fds.values()) + ((sec_r,) if sec_r is not None else ())
        preexec = _preexec(plan, limits, workdir, [_GUARD_FILE, _PROGRAM_FILE], uid)
        proc = _spawn(argv, "/" if plan.kind == "bwrap" else workdir, env, preexec, limits, out_w, out_r, pass_fds)
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
        else:  # bwrap and the unshare shell both report a signal as 128 + its number
            note = _signal_note(returncode, shell=plan.kind == "bwrap" or bool(plan.wrapper))
        output = (output[-(OUTPUT_CHARS - len(note)):] + note) if note else output[-OUTPUT_CHARS:]
        if timed_out:
            return ExecutionResult("timeout", None, duration, output)
        return ExecutionResult("passed" if returncode == 0 else "failed", returncode, duration, output)
    finally:
        if proc is not None and proc.returncode is None:  # interrupted (e.g. KeyboardInterrupt) mid-run
            _stop(proc, plan, out_r, bytearray())
            proc.wait()
        for fd in (out_r, out_w, pidfd, sec_r, *fds.values()):
            if fd is not None:
                os.close(fd)
        _remove_tree(workdir)
        if plan.root:
            _uids().release(uid)


def _uids() -> UidPool:
    global _UIDS
    if _UIDS is None or _UIDS.pid != os.getpid():  # a forked evaluator gets its own range
        _UIDS = UidPool()
    return _UIDS


def plan() -> Plan:
    """The best plan that runs a probe program here (probed once per process, then announced)."""
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
            for option in candidates():
                option.skipped += failures
                try:
                    result = _execute(f"print({_PROBE_TOKEN!r})", probe_limits, option)
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    failures.append(f"{option.name}: {exc}")
                    continue
                if result.passed and _PROBE_TOKEN in result.output:
                    _PLAN = option
                    break
                failures.append(f"{option.name}: {result.status} rc={result.returncode} {result.output[-300:]!r}")
            else:
                hint = (" (as root each program runs under its own uid: the interpreter and tempfile.gettempdir() "
                        "must be readable by it, or mount namespaces must be allowed)" if os.geteuid() == 0 else "")
                raise RuntimeError("t2l sandbox: no way to start a sandboxed interpreter on this machine" + hint
                                   + ":\n  " + "\n  ".join(failures))
            from t2l_framework.console import say

            say(f"code sandbox: {_PLAN.describe()['summary']}")
    return _PLAN


def sandbox_info() -> dict:
    """The layers active on this machine (runs the one-time probe): ``summary`` is one line;
    ``unavailable`` says why better isolation is not in use."""
    return plan().describe()


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run ``program`` (Python source) in the sandbox. Never raises because of the program."""
    if not isinstance(program, str):
        raise TypeError(f"run_python: program must be str, got {type(program).__name__}")
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"run_python: limits must be SandboxLimits, got {type(limits).__name__}")
    return _execute(program, limits, plan())


def run_many(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None,
             progress: Callable[[int], None] | None = None) -> list[ExecutionResult]:
    """``run_python`` over ``programs`` in a thread pool; results in input order. ``progress(n_done)``
    is called from the calling thread after each program. Concurrent programs are isolated from
    each other (own pid and mount namespaces; as root, own uids and process budgets)."""
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
    chosen = plan()
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    results: list[ExecutionResult | None] = [None] * len(programs)
    pool = ThreadPoolExecutor(max_workers=min(workers, len(programs), UidPool.SLOTS), thread_name_prefix="t2l-sandbox")
    try:
        futures = {pool.submit(_execute, program, limits, chosen): i for i, program in enumerate(programs)}
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress is not None:
                progress(done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results
