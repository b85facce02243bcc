"""The probation watchdog on its own: commit on the welcome, roll back at the deadline, a stop is no verdict.

The deadline is read from an injected clock, so no test waits for a probation to run out.
"""

import threading

import pytest

from agent import statefile
from agent.probation import Probation

OLD = b"old program\n"
NEW = b"new program\n"

pytestmark = pytest.mark.timeout(10)


class ManualClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def home(tmp_path):
    (tmp_path / "restic-manager-agent.pyz").write_bytes(NEW)
    (tmp_path / "restic-manager-agent.pyz.old").write_bytes(OLD)
    return tmp_path


def new_probation(home, **kw):
    """A Probation for the 2.0.0 program in ``home``; keyword arguments replace the harmless defaults."""
    kw = {"stopped": lambda: False, "on_rollback": lambda: None, "tick": 0.01, **kw}
    return Probation(str(home / "restic-manager-agent.pyz"), str(home), "2.0.0", 60.0, **kw)


def on_probation(home, stop=None):
    """A Probation watching the program swapped in by job-p; returns it, its clock and the rollbacks seen."""
    marker = statefile.new_marker("job-p", "1.0.0", "2.0.0", "ab" * 32)
    statefile.write_marker(str(home), marker)
    clock, rollbacks = ManualClock(), []
    probation = new_probation(
        home,
        stopped=(stop or threading.Event()).is_set,
        on_rollback=lambda: rollbacks.append(True),
        clock=clock,
    )
    probation.watch(marker)
    return probation, clock, rollbacks


def test_a_welcome_commits_and_ends_the_watch(home):
    probation, clock, rollbacks = on_probation(home)
    assert probation.active
    probation.commit()
    probation.thread.join(2)
    assert not probation.thread.is_alive() and not probation.active
    clock.now = 1000.0  # long past the deadline: a committed program stays
    assert rollbacks == []
    state = statefile.read_state(str(home))
    assert (state["job_id"], state["outcome"], state["reported"]) == ("job-p", "committed", True)
    assert statefile.read_marker(str(home)) is None
    assert (home / "restic-manager-agent.pyz").read_bytes() == NEW


def test_the_deadline_rolls_back_and_asks_for_the_restart(home):
    probation, clock, rollbacks = on_probation(home)
    assert probation.thread.is_alive()  # the deadline is 60 s away on the injected clock
    clock.now = 60.0
    probation.thread.join(2)
    assert rollbacks == [True] and not probation.active
    assert (home / "restic-manager-agent.pyz").read_bytes() == OLD
    state = statefile.read_state(str(home))
    assert state["outcome"] == "rolled_back"
    assert state["error"] == "new version 2.0.0 never reached the server within 60 s"
    assert statefile.read_marker(str(home)) is None
    probation.commit()  # a welcome after the rollback changes nothing
    assert statefile.read_state(str(home))["outcome"] == "rolled_back"


def test_a_stop_ends_the_watch_without_a_verdict(home):
    stop = threading.Event()
    probation, clock, rollbacks = on_probation(home, stop=stop)
    stop.set()
    probation.thread.join(2)
    assert not probation.thread.is_alive()
    clock.now = 1000.0
    assert rollbacks == [] and probation.active  # the next start continues the probation
    assert statefile.read_marker(str(home))["job_id"] == "job-p"
    assert (home / "restic-manager-agent.pyz").read_bytes() == NEW


def test_without_old_the_deadline_keeps_the_new_program(home):
    (home / "restic-manager-agent.pyz.old").unlink()
    probation, clock, rollbacks = on_probation(home)
    clock.now = 60.0
    probation.thread.join(2)
    assert rollbacks == []  # nothing to restore: no restart either
    assert (home / "restic-manager-agent.pyz").read_bytes() == NEW
    assert "cannot roll back" in statefile.read_state(str(home))["error"]


def test_start_up_puts_a_swapped_program_on_probation(home):
    statefile.write_marker(str(home), statefile.new_marker("job-p", "1.0.0", "2.0.0", "ab" * 32))
    probation = new_probation(home)
    assert probation.start_up() is False  # carry on: this program is on probation
    assert probation.active and probation.thread.is_alive()
    assert statefile.read_state(str(home))["outcome"] == "swapped"
    probation.commit()
    probation.thread.join(2)
    assert statefile.read_state(str(home))["outcome"] == "committed"


def test_start_up_says_restart_when_repair_rolled_back(home):
    statefile.write_marker(
        str(home),
        {**statefile.new_marker("job-p", "1.0.0", "2.0.0", "ab" * 32), "rollback": "never reached the server"},
    )
    probation = new_probation(home)
    assert probation.start_up() is True  # the previous program is back: exit so it gets started
    assert probation.thread is None and not probation.active
    assert (home / "restic-manager-agent.pyz").read_bytes() == OLD
