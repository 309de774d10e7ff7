"""Run model-generated Python (HumanEval / MBPP pass@1) in a child that cannot harm the evaluator,
the machine, or the other programs running beside it.

Layered, because each layer alone can be bypassed (``sandbox_info()`` says which are active here,
and the first use prints it as one ``[t2l] code sandbox: ...`` line):

1. **Child process**: ``python -s -P -B`` in its own session and a fresh work dir (removed
   afterwards), an empty environment, stdin closed, only an output tail kept; wall-clock timeout,
   then SIGKILL of everything it started.
2. **rlimits**: memory (AS), CPU, file size, open files, no core, no message queues, processes
   (NPROC). As root each program runs under a uid of its own, so NPROC is its own budget and
   file permissions and ``/proc`` keep it off root's files and the other programs.
3. **Isolation** (``bwrap.py``, else the fallback ``namespaces.py``): with bubblewrap, ``/`` is
   read-only (the size-capped tmpfs work dir is the only writable place), ``/proc`` is fresh
   (host processes invisible), and network, pid, IPC and UTS namespaces are new.
4. **seccomp** (``seccomp.py``): ``memfd_create``, SysV ``shmget``, ``mq_open`` and
   ``io_uring_setup`` are refused: memory outside RLIMIT_AS.
5. **Python guard** (``guard.py``), run before the program: readable PermissionErrors for the
   common mistakes (fork, subprocess, sockets, writes outside the work dir). Bypassable by design.

Not protected: this is no VM (kernel exploits, side channels, reading world-readable files).
For untrusted models at scale, run the evaluation in a disposable VM that holds no credentials.
See docs/security.md.
"""

from t2l_framework.eval.sandbox.limits import OUTPUT_CHARS, ExecutionResult, SandboxLimits
from t2l_framework.eval.sandbox.runner import run_many, run_python, sandbox_info

__all__ = ["SandboxLimits", "ExecutionResult", "run_python", "run_many", "sandbox_info", "OUTPUT_CHARS"]
