"""A small seccomp filter: refuse the system calls that make memory no rlimit counts.

``memfd_create`` and System V ``shmget`` allocate shared memory outside RLIMIT_AS (a program
held 768 MB with ``memory_mb=256`` through memfds); POSIX message queues likewise;
``io_uring_setup`` would run file operations that seccomp cannot see. Each returns EPERM, so a
program that tries gets an ordinary ``PermissionError``. System calls of another ABI (x32,
32-bit compat) are refused wholesale: a 64-bit interpreter never makes them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# linux/audit.h, linux/seccomp.h, linux/filter.h
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_BIT = 0x40000000
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_NR_OFFSET, _ARCH_OFFSET = 0, 4  # struct seccomp_data

REFUSED = ("memfd_create", "memfd_secret", "shmget", "mq_open", "io_uring_setup")
_SYSCALLS = {
    "x86_64": {"memfd_create": 319, "memfd_secret": 447, "shmget": 29, "mq_open": 240, "io_uring_setup": 425},
    "aarch64": {"memfd_create": 279, "memfd_secret": 447, "shmget": 194, "mq_open": 180, "io_uring_setup": 425},
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)  # struct sock_filter


def filter_program(machine: str | None = None) -> bytes | None:
    """The BPF program (``struct sock_filter[]``, what ``bwrap --seccomp`` reads), or None on an
    architecture without a table here."""
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        return None
    deny = _RET_ERRNO | errno.EPERM
    numbers = [_SYSCALLS[machine][name] for name in REFUSED]
    n = len(numbers)
    prog = [_insn(_LD_W_ABS, 0, 0, _ARCH_OFFSET),
            _insn(_JEQ_K, 1, 0, _AUDIT_ARCH[machine]),
            _insn(_RET_K, 0, 0, deny),  # another ABI
            _insn(_LD_W_ABS, 0, 0, _NR_OFFSET)]
    if machine == "x86_64":
        prog.append(_insn(_JGE_K, n + 1, 0, _X32_BIT))  # x32: jump to deny
    for i, nr in enumerate(numbers):
        prog.append(_insn(_JEQ_K, n - i, 0, nr))  # jump over the rest and ALLOW, onto deny
    prog += [_insn(_RET_K, 0, 0, _RET_ALLOW), _insn(_RET_K, 0, 0, deny)]
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


def installer(program: bytes):
    """A function that loads ``program`` on the calling process (for a ``preexec_fn``: everything is
    allocated here, in the parent). NO_NEW_PRIVS must be set before it runs."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))

    def install() -> None:
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp: {os.strerror(err)}")

    install.keep = (buffer, fprog)  # alive as long as the function
    return install
