"""Which isolation this machine allows, best first, and how to describe it to the user.

Candidates are probed once (``runner.plan``): bubblewrap; then the hand-written namespaces
(network+pid+mount, network+mount, mount); then no namespaces. As root, every program runs
under a uid of its own (``UidPool``), so RLIMIT_NPROC is a per-program budget (a fork bomb in one
cannot starve another), and programs cannot read each other's files or ``/proc`` entries.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from t2l_framework.eval.sandbox import bwrap, mounts, namespaces, seccomp
from t2l_framework.eval.sandbox.namespaces import CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER


@dataclass
class Plan:
    """One way to isolate a program. kind: ``bwrap`` | ``namespaces``."""

    name: str
    kind: str
    root: bool  # the evaluator is root: a uid per program
    ns_flags: int = 0
    userns: bool = False
    wrapper: list[str] = field(default_factory=list)  # namespaces with a pid namespace: unshare ... /bin/sh -c
    mounts: bool = False
    covers: list[tuple[str, str, list[str]]] = field(default_factory=list)
    bwrap: str | None = None
    setpriv: str | None = None
    seccomp: bytes | None = None
    skipped: list[str] = field(default_factory=list)  # why better plans are not in use

    def namespaces(self) -> list[str]:
        if self.kind == "bwrap":
            return (["user"] if not self.root else []) + ["network", "pid", "mount", "ipc", "uts"]
        return [n for flag, n in ((CLONE_NEWUSER, "user"), (CLONE_NEWNET, "network"), (CLONE_NEWPID, "pid"),
                                  (CLONE_NEWNS, "mount")) if self.ns_flags & flag]

    def describe(self) -> dict:
        """The layers in force (what ``sandbox_info()`` returns and the eval prints)."""
        bw = self.kind == "bwrap"
        covers = [c[0] for c in self.covers if not (bw and c[0].startswith("/dev"))]
        info = {
            "plan": self.name, "isolation": self.kind,
            "user": "own uid per program (dropped from root)" if self.root else f"uid {os.getuid()} (own)",
            "per_program_uid": self.root,
            "rlimits": ["AS", "CPU", "FSIZE", "CORE=0", "NPROC", "NOFILE", "MSGQUEUE=0"],
            "namespaces": self.namespaces(),
            "read_only_root": bw, "fresh_proc": bw,
            "private_mounts": covers + (["work dir (tmpfs)"] if bw or self.mounts else []),
            "exposed_read_only": [p for c in self.covers for p in c[2]],
            "seccomp": list(seccomp.REFUSED) if self.seccomp else [],
            "wrapper": (self.bwrap if bw else " ".join(self.wrapper)) or None, "guard": True,
            "unavailable": list(self.skipped),
        }
        missing = [name for name, on in (("read-only /", bw), ("fresh /proc", bw), ("per-program uid", self.root),
                                         ("seccomp", bool(self.seccomp)), ("pid namespace", "pid" in info["namespaces"]),
                                         ("network namespace", "network" in info["namespaces"])) if not on]
        info["summary"] = (f"{self.name}: " + ", ".join(info["namespaces"] or ["no namespaces"])
                           + (f"; NOT active: {', '.join(missing)}" if missing else "; all layers active"))
        return info


def candidates() -> list[Plan]:
    """Every plan this machine might allow, best first (the probe picks the first that runs)."""
    root = os.geteuid() == 0
    program = seccomp.filter_program()
    covers = mounts.covers(hide_unreachable=root)
    plans, skipped = [], []
    path, why = bwrap.find_bwrap()
    setpriv = bwrap.find_setpriv() if root else None
    if path and (setpriv or not root):
        plans.append(Plan("bwrap", "bwrap", root, covers=covers, bwrap=path, setpriv=setpriv, seccomp=program))
    else:
        skipped.append(why or "bwrap: setpriv (util-linux) not found, needed to drop root")
    wrapper = namespaces.unshare_wrapper()
    user = 0 if root else CLONE_NEWUSER
    if wrapper:
        plans.append(Plan("net+pid+mount", "namespaces", root, user | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID,
                          not root, wrapper, True, covers, seccomp=program))
    plans += [Plan("net+mount", "namespaces", root, user | CLONE_NEWNS | CLONE_NEWNET, not root, [], True, covers,
                   seccomp=program),
              Plan("mount", "namespaces", root, user | CLONE_NEWNS, not root, [], True, covers, seccomp=program),
              Plan("no namespaces", "namespaces", root, 0, False, [], False, [], seccomp=program)]
    for plan in plans:
        plan.skipped = list(skipped)
    return plans


class UidPool:
    """Uids for concurrently running programs (root only): ``base + slot``, with ``base`` derived
    from our pid so two evaluators on one machine do not share uids either."""

    SLOTS = 256

    def __init__(self):
        self.pid = os.getpid()
        self.base = 0x60000000 + (self.pid & 0x3FFFFF) * self.SLOTS
        self.free = list(range(self.SLOTS))
        self.cond = threading.Condition()

    def acquire(self) -> int:
        with self.cond:
            while not self.free:
                self.cond.wait()
            return self.base + self.free.pop(0)

    def release(self, uid: int) -> None:
        with self.cond:
            self.free.append(uid - self.base)
            self.cond.notify()
