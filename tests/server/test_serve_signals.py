"""The server's stop signals only set a flag; the main thread's loop sees it and returns."""

import os
import signal

from app.serve import wait_for_stop_signal


def test_sigterm_ends_the_wait_with_its_number_and_the_handler_only_sets_a_flag():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    polls = []

    def every():
        # Called at each poll slice while no signal was seen: the first one sends SIGTERM.
        polls.append(len(polls))
        if len(polls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        # No timer: the loop itself sends the signal, so the check counts poll slices, not seconds
        # (the handler runs before kill() returns; the loop's next check must see the flag).
        assert wait_for_stop_signal(poll_s=0.01, every=every) == signal.SIGTERM
        assert polls == [0]  # the wait ended at the first check after the signal, not later
        handler = signal.getsignal(signal.SIGTERM)
        # The installed handler is agent.daemon's: one attribute store on a StopFlag, no Event, no lock.
        assert handler.__module__ == "agent.daemon"
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
