"""The in-process guard: run in the sandboxed child before the program (``python guard.py program.py``).

It disables process creation, signals to other processes, the network and writes outside the
work dir, so that the common mistakes of generated code fail with a readable PermissionError.
It is bypassable by design (ctypes, ``io.FileIO``, gc): the OS layers (``isolation.py``) are the
boundary. Standard library only: the child imports nothing from t2l_framework.
"""

import builtins
import errno
import io
import os
import posix
import sys
import types


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


if __name__ == "__main__":
    _main()
