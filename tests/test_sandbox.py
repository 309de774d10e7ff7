"""The code-execution sandbox (``t2l_framework.eval.sandbox``): statuses, the timeout, fork bombs,
memory, writes, the network, signals, cleanup, and the OS layers under a program that bypasses
the Python guard with ctypes. Every test here fails if the layer it names stops working."""

from __future__ import annotations

import mmap
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from t2l_framework.eval.sandbox import ExecutionResult, SandboxLimits, run_many, run_python, sandbox_info

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only")

QUICK = SandboxLimits(timeout_s=5)


@pytest.fixture(scope="module")
def info():
    return sandbox_info()


def _marker() -> str:
    return "t2l" + uuid.uuid4().hex[:12]  # 15 characters: fits a process name (comm)


def _name_self(marker: str) -> str:
    """Program prelude: rename the process (children inherit the name) so the test can find it."""
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {marker.encode()!r}, 0, 0, 0)\n"


def _processes_with(marker: str) -> list[str]:
    """Processes (zombies included) whose name or command line holds ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm", "rb") as f:
                comm = f.read().strip()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if comm == marker.encode() or marker.encode() in cmdline:
            found.append(entry.name)
    return found


def _assert_no_strays(marker: str):
    deadline = time.monotonic() + 1.0  # SIGKILL is asynchronous; give the kernel a moment
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], f"processes of the sandboxed program survived: {left}"


# --- statuses ---------------------------------------------------------------------------------------

def test_passing_failing_and_broken_programs():
    ok = run_python("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('fine')", QUICK)
    assert (ok.status, ok.returncode, ok.passed) == ("passed", 0, True)
    assert ok.output == "fine\n"
    bad = run_python("def add(a, b):\n    return a - b\nassert add(2, 3) == 5, 'add is wrong'", QUICK)
    assert (bad.status, bad.passed) == ("failed", False) and bad.returncode == 1
    assert "AssertionError: add is wrong" in bad.output
    assert 'File "program.py", line 3' in bad.output  # the traceback names the program
    syntax = run_python("def add(a, b)\n    return a + b\n", QUICK)
    assert syntax.status == "failed" and "SyntaxError" in syntax.output
    exit_code = run_python("import sys\nsys.exit(3)", QUICK)
    assert (exit_code.status, exit_code.returncode) == ("failed", 3)


def test_ordinary_programs_are_not_broken():
    program = ("import math, re, collections, itertools, heapq, typing, functools, string, hashlib, bisect, json\n"
               "import random, statistics, fractions, decimal, datetime, copy, operator, threading, asyncio\n"
               "from typing import List\n"
               "assert hashlib.md5(b'abc').hexdigest() == '900150983cd24fb0d6963f7d28e17f72'\n"
               "assert heapq.nsmallest(2, [5, 1, 4]) == [1, 4] and math.gcd(12, 18) == 6\n"
               "async def f():\n    return 7\n"
               "assert asyncio.run(f()) == 7  # an event loop needs socketpair(): still allowed\n"
               "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
               "import pickle\nclass A: pass\nassert type(pickle.loads(pickle.dumps(A()))).__name__ == 'A'\n")
    result = run_python(program, QUICK)
    assert result.passed, result.output


def test_numpy_imports():
    pytest.importorskip("numpy")
    result = run_python("import numpy as np\nassert int(np.arange(10).sum()) == 45", QUICK)
    assert result.passed, result.output


def test_minimal_environment_and_fixed_hash_seed(monkeypatch):
    monkeypatch.setenv("T2L_SANDBOX_SECRET", "hunter2")
    program = "import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())\nprint(hash('t2l'))"
    first, second = run_python(program, QUICK), run_python(program, QUICK)
    assert first.passed, first.output
    env_line, home_line, hash_line = first.output.splitlines()
    assert "T2L_SANDBOX_SECRET" not in env_line and "hunter2" not in first.output
    assert {"PATH", "HOME", "LANG", "PYTHONHASHSEED"} <= set(eval(env_line))
    assert home_line == "True"
    assert hash_line == second.output.splitlines()[2]  # PYTHONHASHSEED=0 reaches the child


def test_output_is_a_bounded_tail():
    result = run_python("for i in range(200000):\n    print('line', i)\nprint('THE END')", QUICK)
    assert result.passed
    assert len(result.output) <= 2000 and result.output.endswith("THE END\n")


# --- time, processes, memory -----------------------------------------------------------------------------

@pytest.mark.parametrize("body", ["while True:\n    pass", "import time\ntime.sleep(600)",
                                  "import os\nwhile True:\n    os.write(1, b'y' * 65536)"],
                         ids=["spin", "sleep", "flood"])
def test_timeout_kills_the_program(body):
    """A sleeping program uses no CPU, so only our kill (not RLIMIT_CPU) can end it; one that floods
    its output must not keep the evaluator reading past the deadline."""
    marker = _marker()
    results = []
    start = time.monotonic()
    worker = threading.Thread(target=lambda: results.append(
        run_python(_name_self(marker) + "print('started', flush=True)\n" + body, SandboxLimits(timeout_s=1))))
    worker.start()
    worker.join(10)
    elapsed = time.monotonic() - start
    assert results, "run_python did not return: the timed-out program was not killed"
    result = results[0]
    assert (result.status, result.returncode, result.passed) == ("timeout", None, False)
    assert 0.9 <= result.duration_s < 4 and elapsed < 4, (result.duration_s, elapsed)
    assert len(result.output) <= 2000 and result.output.endswith("killed after 1 s]")
    if "os.write" not in body:
        assert result.output.startswith("started\n")  # what it printed before the kill is kept
    _assert_no_strays(marker)


def test_signals_end_the_program_as_usual():
    for program in ("import os\nos.abort()", "import signal\nsignal.raise_signal(signal.SIGTERM)",
                    "import signal\nsignal.alarm(1)\nwhile True:\n    pass"):
        result = run_python(program, QUICK)
        assert result.status == "failed" and result.returncode != 0, (program, result)


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess, sys\nwhile True:\n"
    "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)  # {m}'])",
    "import multiprocessing, time\nif __name__ == '__main__':\n"
    "    while True:\n        multiprocessing.Process(target=time.sleep, args=(30,)).start()",
    "import os\nos.system('sleep 30 # {m}')\nos.posix_spawn('/bin/sleep', ['sleep', '30', '{m}'], {{}})",
], ids=["os.fork", "subprocess", "multiprocessing", "system+posix_spawn"])
def test_fork_bombs_are_contained(bomb):
    marker = _marker()
    start = time.monotonic()
    result = run_python(_name_self(marker) + bomb.format(m=marker), QUICK)
    assert not result.passed and result.status == "failed", result
    assert "not allowed" in result.output
    assert time.monotonic() - start < 5
    _assert_no_strays(marker)


@pytest.mark.parametrize("program", ["x = bytearray(64 * 2**30)",
                                     "chunks = []\nwhile True:\n    chunks.append(b'x' * (100 * 2**20))"],
                         ids=["huge", "gradual"])
def test_memory_limit(program):
    result = run_python(program, SandboxLimits(timeout_s=10, memory_mb=512))
    assert (result.status, result.returncode) == ("failed", 1), result
    assert "MemoryError" in result.output
    assert len(bytearray(50 * 2**20)) == 50 * 2**20  # and the test process is fine


def test_parent_with_a_huge_address_space_can_still_spawn():
    """An evaluator holding a CUDA model has a huge virtual size; RLIMIT_AS must only hit the child."""
    reserved = mmap.mmap(-1, 64 << 30, flags=mmap.MAP_PRIVATE, prot=0)  # PROT_NONE: address space, no memory
    try:
        result = run_python("print(sum(range(10)))", SandboxLimits(timeout_s=5, memory_mb=256))
    finally:
        reserved.close()
    assert result.passed and result.output == "45\n", result


# --- files, network, signals, cleanup -----------------------------------------------------------------

def test_writes_outside_the_work_dir_are_refused(tmp_path):
    in_tmp = f"/tmp/t2l-sandbox-test-{uuid.uuid4().hex}.txt"  # /tmp is world-writable: the guard must stop it
    in_home = tmp_path / "victim.txt"
    for target in (in_tmp, str(in_home)):
        result = run_python(f"with open({target!r}, 'w') as f:\n    f.write('pwned')", QUICK)
        assert result.status == "failed" and "PermissionError" in result.output, result
        assert not os.path.exists(target)
    existing = tmp_path / "keep.txt"
    existing.write_text("precious")
    for attack in (f"import os\nos.remove({str(existing)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                   f"import os\nos.rename({str(existing)!r}, 'stolen.txt')",
                   f"import pathlib\npathlib.Path({str(existing)!r}).write_text('x')",
                   f"import os\nos.symlink({str(existing)!r}, 'link')\nopen('link', 'w').write('x')"):
        result = run_python(attack, QUICK)
        assert result.status == "failed" and "PermissionError" in result.output, (attack, result)
    assert existing.read_text() == "precious"


def test_writes_inside_the_work_dir_are_allowed():
    program = ("import os, tempfile, shutil\n"
               "with open('out.txt', 'w') as f:\n    f.write('hello')\n"
               "assert open('out.txt').read() == 'hello'\n"
               "os.makedirs('a/b')\nshutil.rmtree('a')\n"
               "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('x')\n"
               "assert os.path.dirname(f.name) == os.getcwd()  # TMPDIR is the work dir\n")
    result = run_python(program, QUICK)
    assert result.passed, result.output


def test_no_network():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        for program in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)",
                        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
                        "import socket\nsocket.getaddrinfo('example.com', 80)"):
            result = run_python(program, QUICK)
            assert result.status == "failed", result
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_cannot_kill_the_evaluator():
    result = run_python("import os\nos.kill(os.getppid(), 9)", QUICK)
    assert result.status == "failed" and "PermissionError" in result.output
    result = run_python(f"import os\nos.killpg({os.getpgid(0)}, 9)", QUICK)
    assert result.status == "failed"
    os.kill(os.getpid(), 0)  # still here


def test_work_dir_is_removed_even_when_made_read_only():
    program = ("import os\nprint(os.getcwd())\n"
               "os.makedirs('ro/deep')\nopen('ro/deep/f', 'w').write('x')\n"
               "os.chmod('ro/deep/f', 0o400)\nos.chmod('ro/deep', 0o500)\nos.chmod('ro', 0o500)\nos.chmod('.', 0o500)")
    result = run_python(program, QUICK)
    assert result.passed, result.output
    workdir = result.output.splitlines()[0]
    assert "t2l-sandbox-" in workdir and not os.path.exists(workdir)
    timeout = run_python("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass", SandboxLimits(timeout_s=1))
    assert timeout.status == "timeout" and not os.path.exists(timeout.output.splitlines()[0])


# --- run_many, misuse -----------------------------------------------------------------------------------

def test_run_many_keeps_order_and_reports_progress():
    programs = ["print(0)", "assert False", "while True:\n    pass", "def f(:", "print(4)", "import sys\nsys.exit(5)"]
    seen = []
    results = run_many(programs, SandboxLimits(timeout_s=1.5), workers=3, progress=seen.append)
    assert [r.status for r in results] == ["passed", "failed", "timeout", "failed", "passed", "failed"]
    assert results[0].output == "0\n" and results[4].output == "4\n" and results[5].returncode == 5
    assert all(isinstance(r, ExecutionResult) for r in results)
    assert seen == [1, 2, 3, 4, 5, 6]
    assert run_many([], QUICK) == []


def test_misuse_raises_clear_errors():
    for bad in (dict(timeout_s=0), dict(timeout_s=float("inf")), dict(memory_mb=-1), dict(max_processes=0),
                dict(max_file_mb=1.5), dict(memory_mb=512.0), dict(memory_mb=True)):
        with pytest.raises(ValueError, match="SandboxLimits"):
            SandboxLimits(**bad)
    with pytest.raises(TypeError):
        run_python(b"print(1)")
    with pytest.raises(ValueError, match="workers"):
        run_many(["print(1)"], workers=0)


# --- the OS layers, under programs that bypass the Python guard with ctypes --------------------------

LIBC = "import ctypes, os, struct, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def test_process_limit_holds_without_the_guard(info):
    marker = _marker()
    program = (_name_self(marker) + LIBC + "n = 0\nwhile True:\n    pid = libc.fork()\n"
               "    if pid == 0:\n        time.sleep(60)\n    if pid < 0:\n        break\n    n += 1\n"
               "print('forked', n, ctypes.get_errno())")
    limits = SandboxLimits(timeout_s=5, max_processes=8)
    start = time.monotonic()
    result = run_python(program, limits)
    assert time.monotonic() - start < 5, result
    words = result.output.split()
    # the budget is "tasks of the uid at start + max_processes": concurrent sandboxes that end can add a few
    assert words[0] == "forked" and int(words[1]) <= limits.max_processes + 8 and int(words[2]) == 11, result
    if "pid" in info["namespaces"]:  # its sleeping children die with it
        _assert_no_strays(marker)


def test_escaped_children_die_with_the_program(info):
    if "pid" not in info["namespaces"]:
        pytest.skip("no pid namespace here: a child that calls setsid() can outlive the program")
    marker = _marker()
    program = (_name_self(marker) + LIBC + "for _ in range(2):\n    if libc.fork() == 0:\n        libc.setsid()\n"
               "        if libc.fork() == 0:\n            time.sleep(60)\n        os._exit(0)\n"
               "print('parent done')")
    result = run_python(program, QUICK)
    assert result.passed, result.output
    _assert_no_strays(marker)


def test_network_namespace_holds_without_the_guard(info):
    if "network" not in info["namespaces"]:
        pytest.skip("no network namespace on this machine")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        program = (LIBC + "fd = libc.socket(2, 1, 0)\n"
                   f"addr = struct.pack('<HH4s8x', 2, {socket.htons(port)}, bytes([127, 0, 0, 1]))\n"
                   "print(fd >= 0, libc.connect(fd, addr, 16), ctypes.get_errno())")
        result = run_python(program, QUICK)
        assert result.passed, result.output
        created, connected, err = result.output.split()
        assert created == "True" and connected == "-1" and int(err) != 0
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_file_protection_holds_without_the_guard(info, tmp_path):
    if info["user"].endswith("(own)") and "/tmp" not in info["private_mounts"]:
        pytest.skip("the child runs as our own user with the real /tmp: only the guard protects files")
    target = tmp_path / "victim.txt"
    program = (LIBC + f"fd = libc.open({str(target).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
               "print(fd, ctypes.get_errno())")
    result = run_python(program, QUICK)
    assert result.passed, result.output
    assert result.output.split()[0] == "-1"
    assert not target.exists()
    if not info["user"].endswith("(own)"):  # dropped from root: root's own files are protected too
        result = run_python(LIBC + "print(libc.open(b'/etc/t2l-sandbox-victim', os.O_WRONLY | os.O_CREAT, 0o644))",
                            QUICK)
        assert result.output.split()[0] == "-1" and not os.path.exists("/etc/t2l-sandbox-victim")


def test_disk_use_is_capped(info):
    big_file = run_python("with open('big', 'wb') as f:\n    f.write(b'x' * 2**20 * 8)", SandboxLimits(max_file_mb=4))
    assert big_file.status == "failed" and "File too large" in big_file.output, big_file  # RLIMIT_FSIZE
    if "work dir (tmpfs)" not in info["private_mounts"]:
        pytest.skip("no mount namespace: the work dir is on the real disk, only RLIMIT_FSIZE caps files")
    many_files = run_python("for i in range(64):\n    with open(f'f{i}', 'wb') as f:\n"
                            "        f.write(b'x' * 2**20 * 3)", SandboxLimits(max_file_mb=4))
    assert many_files.status == "failed" and "No space left" in many_files.output, many_files


# --- hardening: attacks that went through before bubblewrap, per-program isolation, layer reporting -----

def _skip_unless(info, key: str, why: str):
    """Skip where this machine cannot have the layer; where it can, the sandbox must be using it."""
    from t2l_framework.eval.sandbox import bwrap

    if key in ("read_only_root", "fresh_proc") and bwrap.find_bwrap()[0] is None:
        pytest.skip(f"{why}: no usable bwrap on this machine ({bwrap.find_bwrap()[1]})")
    if key == "per_program_uid" and os.geteuid() != 0:
        pytest.skip(f"{why}: not root, so every program runs under our own uid")
    if key == "seccomp" and platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip(f"{why}: no system call table for {platform.machine()}")
    assert info[key], f"{why} should be active on this machine: {info['summary']}; {info['unavailable']}"


def test_nothing_outside_the_work_dir_is_writable(info):
    """io.FileIO and libc open/write bypass the guard; only a read-only / stops them."""
    _skip_unless(info, "read_only_root", "a read-only / (bubblewrap)")
    name = f"t2l-sandbox-victim-{uuid.uuid4().hex}"
    world_writable = Path(__file__).resolve().parent / f".{name}"  # outside every covered directory
    world_writable.mkdir()
    world_writable.chmod(0o1777)
    targets = [str(world_writable / name)] + [f"{d}/{name}" for d in ("/run/lock", "/var/lock", "/tmp", "/var/tmp",
                                                                       "/dev/shm", "/dev", "/etc")]
    program = (LIBC + "import io\n"
               f"for t in {targets!r}:\n"
               "    try:\n        io.FileIO(t, 'w').write(b'x' * 1000)\n        print('WROTE', t)\n"
               "    except OSError as e:\n        print('refused', e.errno)\n"
               "    fd = libc.open(t.encode(), os.O_WRONLY | os.O_CREAT, 0o644)\n"
               "    if fd >= 0 and libc.write(fd, b'y' * 1000, 1000) > 0:\n        print('WROTE', t)\n"
               "io.FileIO('inside', 'w').write(b'ok')\nprint('inside', open('inside').read())\n")
    try:
        result = run_python(program, QUICK)
        assert result.passed, result.output
        assert "WROTE" not in result.output and "inside ok" in result.output, result.output
        assert not any(os.path.exists(t) for t in targets)
    finally:
        shutil.rmtree(world_writable, ignore_errors=True)


def test_total_written_is_capped_past_the_guard(info):
    _skip_unless(info, "read_only_root", "the size-capped work dir under a read-only / (bubblewrap)")
    program = (LIBC + "total = 0\nchunk = b'z' * 2**20\n"
               "for i in range(96):\n"  # 96 MB in files of 3 MB (under RLIMIT_FSIZE), cap is 4 x 4 MB
               "    fd = libc.open(f'f{i}'.encode(), os.O_WRONLY | os.O_CREAT, 0o644)\n"
               "    for _ in range(3):\n        n = libc.write(fd, chunk, len(chunk))\n"
               "        if n <= 0:\n            break\n        total += n\n"
               "    if n <= 0:\n        break\nprint('total', total, ctypes.get_errno())")
    result = run_python(program, SandboxLimits(timeout_s=10, max_file_mb=4))
    words = result.output.split()
    assert words[0] == "total" and int(words[1]) <= 16 * 2**20 and int(words[2]) == 28, result.output  # ENOSPC


def test_host_processes_are_invisible(info):
    """A secret on a host command line must not be readable through /proc."""
    _skip_unless(info, "fresh_proc", "a fresh /proc (bubblewrap)")
    secret = f"t2l-secret-{uuid.uuid4().hex}"
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", secret])
    try:
        program = ("import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\nleaks = 0\n"
                   "for p in pids:\n    try:\n        leaks += "
                   f"{secret.encode()!r} in open(f'/proc/{{p}}/cmdline', 'rb').read()\n"
                   "    except OSError:\n        pass\nprint(len(pids), leaks)")
        result = run_python(program, QUICK)
    finally:
        host.kill()
        host.wait()
    assert result.passed, result.output
    visible, leaks = map(int, result.output.split())
    assert leaks == 0 and visible <= 3, result.output  # its own init, itself (and a thread of it)


def test_memfd_and_shared_memory_are_refused(info):
    """memfd_create held 768 MB with memory_mb=256: shared memory is outside RLIMIT_AS."""
    _skip_unless(info, "seccomp", "the seccomp filter")
    program = ("import os\nfds = []\ntry:\n    for _ in range(96):\n        fd = os.memfd_create('m')\n"
               "        os.write(fd, b'm' * (8 << 20))\n        fds.append(fd)\n"
               "except OSError as e:\n    print('memfd refused', e.errno)\nprint('held MB', 8 * len(fds))\n"
               "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "print('shmget', libc.shmget(0, 64 << 20, 0o1600), ctypes.get_errno())\n")
    result = run_python(program, SandboxLimits(timeout_s=10, memory_mb=256))
    assert result.passed, result.output
    assert "memfd refused 1" in result.output and "held MB 0" in result.output, result.output
    assert "shmget -1 1" in result.output, result.output


def test_concurrent_programs_cannot_read_or_touch_each_other(info):
    """A reads B's program (the hidden tests) via /proc/<B>/cwd, plants a file, opens /proc/<B>/mem."""
    if os.geteuid() == 0:
        _skip_unless(info, "per_program_uid", "a uid per program")
    else:
        _skip_unless(info, "fresh_proc", "a fresh /proc (bubblewrap)")
    b_name, secret = _marker(), f"hidden-tests-{uuid.uuid4().hex}"
    victim = (_name_self(b_name) + f"SECRET = {secret!r}\nimport os, time\ntime.sleep(3)\n"
              "assert not os.path.exists('planted.py'), 'a file was planted in my work dir'\nprint('B ok')")
    attacker = ("import os, time\nseen = set()\nend = time.time() + 2.5\nwhile time.time() < end:\n"
                "    for p in os.listdir('/proc'):\n        if not p.isdigit() or int(p) == os.getpid():\n"
                "            continue\n        try:\n"
                f"            if open(f'/proc/{{p}}/comm').read().strip() != {b_name!r}:\n                continue\n"
                "        except OSError:\n            continue\n        seen.add(p)\n"
                "        for what, act in (('LEAK', lambda: open(f'/proc/{p}/cwd/program.py').read()),\n"
                "                          ('PLANTED', lambda: open(f'/proc/{p}/cwd/planted.py', 'x').close()),\n"
                "                          ('MEM', lambda: open(f'/proc/{p}/mem', 'rb').close())):\n"
                "            try:\n                act()\n                print(what, flush=True)\n"
                "            except OSError:\n                pass\n    time.sleep(0.05)\nprint('saw B', len(seen))")
    a, b = run_many([attacker, victim], SandboxLimits(timeout_s=8), workers=2)
    assert b.passed and b.output.endswith("B ok\n"), b.output
    assert a.passed and not any(word in a.output for word in ("LEAK", "PLANTED", "MEM")), a.output


def test_a_fork_bomb_in_one_program_does_not_fail_another(info):
    _skip_unless(info, "per_program_uid", "a uid (and process budget) per program (root)")
    bomb = (LIBC + "while libc.fork() >= 0:\n    pass\ntime.sleep(3)")  # every child forks too, then all sleep
    threads = ("import threading, time\ntime.sleep(1.0)  # the bomb has used up its budget by now\n"
               "ts = [threading.Thread(target=time.sleep, args=(0.2,)) for _ in range(12)]\n"
               "[t.start() for t in ts]\n[t.join() for t in ts]\nprint('B ok')")
    results = run_many([bomb, threads, bomb], SandboxLimits(timeout_s=5, max_processes=16), workers=3)
    assert results[1].passed and results[1].output == "B ok\n", results[1].output


def test_the_active_layers_are_reported(info, monkeypatch, capsys):
    from t2l_framework.eval.sandbox import runner
    from t2l_framework.eval.sandbox.plans import Plan

    assert info["summary"].startswith(info["plan"] + ":")
    monkeypatch.setattr(runner, "_PLAN", None)
    again = sandbox_info()
    assert f"[t2l] code sandbox: {again['summary']}" in capsys.readouterr().err  # what the eval output shows
    fallback = Plan("mount", "namespaces", root=False, ns_flags=0x10000000 | 0x00020000, userns=True, mounts=True,
                    skipped=["bwrap not found"]).describe()
    assert fallback["unavailable"] == ["bwrap not found"]
    for missing in ("read-only /", "fresh /proc", "per-program uid", "seccomp", "pid namespace", "network namespace"):
        assert missing in fallback["summary"].split("NOT active: ")[1]


def test_the_fallback_still_runs_where_bwrap_cannot(monkeypatch):
    from t2l_framework.eval.sandbox import bwrap, runner

    monkeypatch.setattr(bwrap, "find_bwrap", lambda: (None, "bwrap disabled by the test"))
    monkeypatch.setattr(runner, "_PLAN", None)
    info = sandbox_info()
    assert info["isolation"] == "namespaces" and "bwrap disabled by the test" in info["unavailable"]
    result = run_python("import os\nprint(os.getcwd().startswith('/tmp/t2l-sandbox-'))", QUICK)
    assert result.passed and result.output == "True\n", result.output
    if info["seccomp"]:  # the same filter, installed by our own preexec
        refused = run_python("import os\ntry:\n    os.memfd_create('m')\nexcept PermissionError:\n    print('refused')")
        assert refused.output == "refused\n", refused.output
    monkeypatch.setattr(runner, "_PLAN", None)  # the next test probes again


def test_bwrap_makes_the_folders_above_an_exposed_interpreter_traversable():
    """A venv under a covered folder (CI's clone in /tmp/ci/main/.venv): the folders bwrap creates
    between the cover and the read-only bind must be 0755, or the program's uid cannot reach
    its own interpreter's site-packages (numpy failed to import in a clean-clone CI run)."""
    from t2l_framework.eval.sandbox import bwrap

    covers = [("/tmp", "mode=0755,size=1024k,nr_inodes=1024", ["/tmp/ci/main/.venv"])]
    cmd = bwrap.argv("/bin/bwrap", SandboxLimits(), "/tmp/work", {}, None, covers, 12345, "/usr/bin/setpriv")
    bind = cmd.index("/tmp/ci/main/.venv") - 1
    assert cmd[bind] == "--ro-bind"
    for folder in ("/tmp/ci", "/tmp/ci/main"):
        i = cmd.index(folder)
        assert cmd[i - 3:i] == ["--perms", "0755", "--dir"] and i < bind
