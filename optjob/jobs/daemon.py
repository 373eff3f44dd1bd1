"""Who runs the executor: exactly one control process per data directory, started on demand.

* ``optjob serve`` (the HTTP server) and ``optjob run`` run an executor inside themselves
  (``hosted_executor``) when no other one holds the lock.
* Every CLI command that can leave work for an executor (create, stop, wait, run, logs
  --follow) calls ``ensure_executor``: if nobody holds the lock it starts
  ``python -m optjob.jobs.daemon``, a detached executor that exits after it has been idle
  (no active job) for ``OPTJOB_EXECUTOR_IDLE_SECONDS`` (default 60).

The lock is an OFD lock on ``$OPTJOB_HOME/executor.lock``; the kernel drops it when its holder dies
(even by SIGKILL), so a dead control process never blocks its successor, and the successor's
first tick settles or adopts whatever the dead one left behind. The lock's file descriptor is
not inherited by workers (Python opens files close-on-exec), so a surviving worker cannot keep
a dead executor's lock.

Idle exit has one race: a job created just as the daemon decides to leave. The CLI checks the
lock after committing the job; the daemon re-checks the store *after* releasing the lock and
takes the lock back if anything is active, so one of the two always sees the other's work.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from optjob.jobs.environment import worker_environment
from optjob.jobs.executor import Executor
from optjob.jobs.store import Store
from optjob.settings import Settings, load_settings

IDLE_ENV = "OPTJOB_EXECUTOR_IDLE_SECONDS"
DEFAULT_IDLE_S = 60.0


class ExecutorLock:
    """The one-executor-per-home lock; the holder's pid is written into the file for humans.

    It is an open-file-description lock (``F_OFD_SETLK``), not ``flock``, because OFD locks can be
    *queried* (``F_OFD_GETLK``) without being taken. A probe that took the lock for a moment, as
    ``holder()`` once did, made a daemon starting at that instant believe another executor ran
    and leave, stranding the jobs it was started for.
    """

    def __init__(self, settings: Settings) -> None:
        self.path = settings.home / "executor.lock"
        self._fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self) -> bool:
        fd = self._open()
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def held(self) -> bool:
        """Whether any open file description (this process's included) holds the lock."""
        fd = self._open()
        try:
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK))
        finally:
            os.close(fd)
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK

    def holder(self, settle_s: float = 2.0) -> int | None:
        """The pid that holds the lock, or None when no executor is running.

        A new holder writes its pid just after it takes the lock, so an empty file under a held
        lock is waited out briefly rather than reported as "nobody".
        """
        deadline = time.monotonic() + settle_s
        while self.held():
            try:
                pid = int(self.path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid or time.monotonic() > deadline:
                return pid or None
            time.sleep(0.01)
        return None


# struct flock on Linux (x86_64 and aarch64): l_type, l_whence, l_start, l_len, l_pid, padding.
_FLOCK = "hhqqi4x"


def _flock(kind: int) -> bytes:
    """A whole-file lock request; l_pid must be 0 for OFD locks."""
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)


def executor_pid(settings: Settings) -> int | None:
    return ExecutorLock(settings).holder()


def ensure_executor(settings: Settings) -> bool:
    """Start a detached executor daemon unless one runs for this home; True if one was started."""
    if executor_pid(settings) is not None:
        return False
    settings.home.mkdir(parents=True, exist_ok=True)
    with open(settings.home / "executor.log", "ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "optjob.jobs.daemon"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_environment(settings),
            start_new_session=True,
        )
    return True


def serve(settings: Settings, *, idle_exit_s: float | None, stop: threading.Event | None = None) -> int:
    """Run the executor under the lock until stopped or idle; 0 if another executor already runs."""
    stop = stop or threading.Event()
    lock = ExecutorLock(settings)
    store = Store(settings.db_path)
    if not lock.acquire():
        return 0
    executor = Executor(settings, store=store)
    while True:
        executor.run(stop, idle_exit_s=idle_exit_s)
        lock.release()
        if stop.is_set() or not store.active() or not lock.acquire():
            return 0
        # A job arrived while we were leaving and we got the lock back: keep going.


@contextmanager
def hosted_executor(settings: Settings) -> Iterator[bool]:
    """Run an executor in a background thread of this process if none runs; yields whether we host it.

    On exit the thread stops; if jobs are still active (other people's, say) a daemon takes
    over and adopts their workers, which keep running throughout.
    """
    lock = ExecutorLock(settings)
    if not lock.acquire():
        yield False
        return
    stop = threading.Event()
    executor = Executor(settings)
    thread = threading.Thread(target=executor.run, args=(stop,), name="optjob-executor", daemon=True)
    thread.start()
    try:
        yield True
    finally:
        stop.set()
        thread.join()
        lock.release()
        if Store(settings.db_path).active():
            ensure_executor(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optjob.jobs.daemon", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE_S),
        help="seconds without active jobs before exiting (default %(default)s)",
    )
    parser.add_argument("--forever", action="store_true", help="never exit for idleness")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    settings = load_settings()
    print(f"optjob executor pid {os.getpid()} for {settings.home}", flush=True)
    return serve(settings, idle_exit_s=None if args.forever else args.idle_exit, stop=stop)


if __name__ == "__main__":
    sys.exit(main())
