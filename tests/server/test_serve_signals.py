"""The server's stop signals only set a flag; the main thread's loop sees it and returns."""

import os
import signal
import threading
import time

from app.serve import wait_for_stop_signal


def test_sigterm_ends_the_wait_with_its_number_and_the_handler_only_sets_a_flag():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    kill = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        kill.start()
        t0 = time.monotonic()
        assert wait_for_stop_signal(poll_s=0.01) == signal.SIGTERM
        assert time.monotonic() - t0 < 2.0
        handler = signal.getsignal(signal.SIGTERM)
        # The installed handler is agent.daemon's: one attribute store on a StopFlag, no Event, no lock.
        assert handler.__module__ == "agent.daemon"
    finally:
        kill.cancel()
        for sig, old in saved.items():
            signal.signal(sig, old)
