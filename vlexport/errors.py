"""Typed errors. The CLI maps them to exit codes: 2 for usage, 1 for a failed check, 128 + N for signal N.

Also the one place that turns SIGINT / SIGTERM / SIGHUP into an exception (:class:`Interrupted`), so that a
staged write cleans up after each of them as it does after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any


class VlexportError(Exception):
    """Base class: a message written for the user, one paragraph, saying what to do."""

    exit_code = 1


class UsageError(VlexportError):
    """Bad input: unknown preset, unsupported task, missing weights, existing output dir, ..."""

    exit_code = 2


class MissingToolchain(UsageError):
    """This machine lacks a package or device the request needs (TensorRT, CUDA, torchao, bitsandbytes).

    A usage error like any other (exit 2); its own class so that callers that enumerate what a machine can run
    (`vlexport bench --suite ... --dry-run`) can leave such a variant out, and only such a variant."""


class InsufficientMemory(MissingToolchain):
    """This machine has too little memory free for a step (a library holding a whole graph several times
    over): like a missing package, what another machine (or another scheme) can do and this one cannot."""


class CheckError(VlexportError):
    """A check failed: validation mismatch, corrupt file, missing component."""

    exit_code = 1


class ValidationError(CheckError):
    """An artifact's outputs differ from the eager reference beyond tolerance (carries the report)."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report  # manifest.ValidationReport


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived while vlexport was writing (:func:`interrupts_as_exceptions`).

    A KeyboardInterrupt, so every ``except KeyboardInterrupt`` / ``except BaseException`` cleanup path
    (``artifact.staged_dir`` removing its partial directory) runs for SIGTERM exactly as it does for Ctrl-C.
    ``committed``: the output a commit had renamed into place before the signal was handled (else None).
    """

    def __init__(self, signum: int, committed: Any = None):
        super().__init__(signum)
        self.signum = signum
        self.committed = committed

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 SIGINT, 143 SIGTERM, 129 SIGHUP


# ---------------------------------------------------------------- signals -> Interrupted
@dataclass
class _Signals:
    depth: int = 0
    previous: dict[int, Any] = field(default_factory=dict)
    hold: int = 0  # > 0: in a rename pair or a cleanup, which a signal must not cut in half; it waits
    pending: int | None = None
    committed: Any = None  # set by artifact.staged_dir once the user's output is in place


SIGNALS = _Signals()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _in_finalizer(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if SIGNALS.hold:
        SIGNALS.pending = SIGNALS.pending or signum
        return
    if _in_finalizer(frame):
        # CPython prints and drops an exception raised inside __del__ ("Exception ignored in ..."): raised
        # there, the signal would be lost (seen in CI: SIGINT during a regex object's collection, then the run
        # went on). Send it again once the finalizer has returned.
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise Interrupted(signum, committed=SIGNALS.committed)


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` inside, so that cleanup code runs for each.

    Only handlers still at their defaults are replaced: SIG_IGN (``nohup``) and a caller's own handler stay.
    A no-op outside the main thread (Python runs signal handlers there only). Nests; the outermost restores.
    """
    if not _main_thread():
        yield
        return
    if SIGNALS.depth == 0:
        SIGNALS.previous, SIGNALS.committed, SIGNALS.pending = {}, None, None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                SIGNALS.previous[sig] = signal.signal(sig, _on_signal)
    SIGNALS.depth += 1
    try:
        yield
    finally:
        SIGNALS.depth -= 1
        if SIGNALS.depth == 0:
            SIGNALS.hold += 1
            for sig, previous in SIGNALS.previous.items():
                signal.signal(sig, previous)
            SIGNALS.hold -= 1
            pending, SIGNALS.pending = SIGNALS.pending, None
            if pending is not None:  # arrived while restoring: delivered as if we had never been here
                signal.raise_signal(pending)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Signals wait until the block ends (a rename pair, a cleanup), then raise :class:`Interrupted`."""
    if not _main_thread():
        yield
        return
    SIGNALS.hold += 1
    try:
        yield
    finally:
        SIGNALS.hold -= 1
        if SIGNALS.hold == 0 and SIGNALS.pending is not None and SIGNALS.depth:
            pending, SIGNALS.pending = SIGNALS.pending, None
            raise Interrupted(pending, committed=SIGNALS.committed)
