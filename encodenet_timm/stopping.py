"""Stop requests: SIGTERM and SIGINT handlers for the length of one `fit(run_dir=...)`.

A scheduler (SLURM, Kubernetes) sends SIGTERM some time before SIGKILL when it preempts a job. While
a training stage runs (inside `StopSignals.deferred`), a signal only sets `StopSignals.signal`; the
loop polls it at every step, finishes the step, writes a checkpoint and raises `Interrupted`.
Elsewhere (the representatives' feature pass, between stages) `Interrupted` is raised at once, as
Ctrl-C raises KeyboardInterrupt. Once one signal has arrived, further ones are ignored (and logged),
so the checkpoint being written and run.json are finished whole.
"""
import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator

from .errors import Interrupted

__all__ = ["StopSignals"]

_logger = logging.getLogger(__name__)


class StopSignals:
    """SIGTERM/SIGINT handlers while the object is entered (``with StopSignals() as stop:``), the previous
    handlers back on exit. ``stop()`` is the signal received (0: none), for the training loop to poll.

    Handlers can only be installed from the main thread; elsewhere the signals keep their handlers and
    ``stop()`` stays 0. A signal ignored (SIG_IGN) when the object is entered stays ignored. A forked
    process (a DataLoader worker) ignores them: its main process stops it.
    """
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = 0
        self._defer = 0
        self._pid = os.getpid()
        self._previous: Dict[int, Any] = {}

    def __call__(self) -> int:
        return self.signal

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            # a signal ignored when the run began (SIGINT in a shell's background job, `nohup`) stays ignored
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        name = signal.Signals(signum).name
        if self.signal:
            _logger.warning("%s while stopping: ignored, the checkpoint and run.json are finished first "
                            "(SIGKILL stops at once)", name)
            return
        self.signal = signum
        if self._defer:
            _logger.warning("%s: finishing the current step, then writing a checkpoint", name)
            return
        raise Interrupted(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside, a signal is only recorded (the caller polls ``stop()``); one recorded and not acted on
        by the end raises `Interrupted` there."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        if self.signal and not self._defer:
            raise Interrupted(self.signal)
