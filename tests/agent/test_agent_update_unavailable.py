"""An agent that cannot update itself says why: in its hello (``update_unavailable``) and in its log at start."""

from __future__ import annotations

import logging

import pytest

from agent import protocol
from agent.client import Agent

pytestmark = pytest.mark.timeout(20)


def agent(config, program):
    return Agent(config, version="1.0.0", program=program, sleep=lambda s: None)


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "restic-manager-agent.pyz"
    path.write_bytes(b"x")
    return str(path)


def test_the_hello_says_why_update_is_missing(make_config, program, tmp_path, release_key):
    no_key = agent(make_config(allow_unsigned_updates=False), program).hello_data()
    assert (no_key["capabilities"], no_key["update_unavailable"]) == ([], "no_release_key")
    from_source = agent(make_config(release_public_key=release_key[1]), None).hello_data()
    assert (from_source["capabilities"], from_source["update_unavailable"]) == ([], "not_replaceable")
    able = agent(make_config(allow_unsigned_updates=False, release_public_key=release_key[1]), program).hello_data()
    assert (able["capabilities"], able["update_unavailable"]) == (["update"], None)
    # The field is optional and a valid hello either way: an old server ignores it, a new one reads it.
    for data in (no_key, able):
        protocol.validate(protocol.Envelope("hello", data, "h1"))


def test_the_agent_logs_at_start_why_it_cannot_update_itself(make_config, program, caplog):
    cfg = make_config("ws://127.0.0.1:9", allow_unsigned_updates=False)
    a = agent(cfg, program)
    a.stop.set()  # run() logs its start, then returns at once
    with caplog.at_level(logging.WARNING, logger="agent.client"):
        a.run()
    text = caplog.text
    assert "cannot update itself: no release key is pinned" in text and cfg.path in text


def test_an_agent_run_from_source_logs_that_it_has_no_program_file_to_replace(make_config, caplog, release_key):
    a = agent(make_config(release_public_key=release_key[1]), None)
    a.stop.set()
    with caplog.at_level(logging.WARNING, logger="agent.client"):
        a.run()
    assert "cannot update itself: it does not run from a program file" in caplog.text


def test_an_agent_that_can_update_logs_no_such_warning(make_config, program, caplog, release_key):
    a = agent(make_config(allow_unsigned_updates=False, release_public_key=release_key[1]), program)
    a.stop.set()
    with caplog.at_level(logging.WARNING, logger="agent.client"):
        a.run()
    assert "cannot update itself" not in caplog.text
