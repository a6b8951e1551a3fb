"""Stopping a run cleanly on SIGTERM or Ctrl-C: after the current optimizer step, with a checkpoint."""
from __future__ import annotations

import signal
import sys
import threading

from . import distributed as fdist


class StopSignals:
    """Within it, SIGTERM (a scheduler's preemption, `kill`) and SIGINT (Ctrl-C, a notebook's interrupt)
    ask the run to stop after the current optimizer step, with a checkpoint, instead of losing the steps
    since the last one. A second SIGINT stops at once (KeyboardInterrupt). Handlers are installed only in
    the main thread and put back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False

    def _request(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (Ctrl-C again: at once)",
              file=sys.stderr, flush=True)

    def agreed(self, ctx: fdist.DistContext) -> bool:
        """Whether any process was asked to stop (all processes get the same answer, so they stop at the
        same step and write the checkpoint together)."""
        if not ctx.distributed:
            return self.signum is not None
        # the largest signal number asked for anywhere: every process then exits with that signal's code
        signum = int(ctx.all_reduce_max(0 if self.signum is None else int(self.signum)))
        if signum and self.signum is None:
            self.signum = signum
        return signum > 0


def ignore_stop_signals(worker_id: int | None = None):
    """A `DataLoader` worker's init: SIGTERM and SIGINT sent to the whole process group (a scheduler's
    preemption, Ctrl-C in a terminal) are for the main process, which stops after its step and then ends
    the workers; a worker killed by them would crash the run before its checkpoint."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
