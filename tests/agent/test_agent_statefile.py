"""The state folder's files: one atomic write for all of them, and the formats the guard and hello rely on."""

import json
import os
import stat

import pytest

from agent import statefile


def test_an_atomic_write_replaces_the_file_whole_and_syncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync_dir = statefile.fsync_dir
    monkeypatch.setattr(statefile, "fsync_dir", lambda d: (synced.append(d), real_fsync_dir(d)))
    target = tmp_path / "f.json"
    target.write_bytes(b"old")
    statefile.write_atomic(str(target), b"new content", mode=0o755)
    assert target.read_bytes() == b"new content"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    assert os.listdir(tmp_path) == ["f.json"]  # no .tmp left behind
    assert synced == [str(tmp_path)]


def test_an_interrupted_atomic_write_leaves_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    target.write_bytes(b"old")

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(statefile.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        statefile.write_atomic(str(target), b"new")
    assert target.read_bytes() == b"old"  # only the .tmp saw the new bytes


def test_the_state_file_is_sorted_indented_json_in_a_folder_made_on_demand(tmp_path):
    state_dir = tmp_path / "var" / "state"
    statefile.write_state(str(state_dir), {"outcome": "swapped", "job_id": "j"})
    assert (state_dir / "update-state.json").read_text() == '{\n  "job_id": "j",\n  "outcome": "swapped"\n}\n'
    assert statefile.read_state(str(state_dir)) == {"job_id": "j", "outcome": "swapped"}


def test_the_marker_is_one_key_per_line(tmp_path):
    marker = statefile.new_marker("job-m", "1.0.0", "2.0.0", "ab" * 32)
    statefile.write_marker(str(tmp_path), marker)
    text = (tmp_path / "probation.json").read_text()
    assert text.splitlines()[0] == "{" and '"job_id": "job-m",' in text.splitlines()
    assert json.loads(text) == marker == statefile.read_marker(str(tmp_path))
    statefile.remove_marker(str(tmp_path))
    statefile.remove_marker(str(tmp_path))  # removing an absent marker is fine
    assert statefile.read_marker(str(tmp_path)) is None


@pytest.mark.parametrize("content", ["{broken", "[1, 2]"])
def test_unreadable_files_are_absent_state_but_an_empty_marker(tmp_path, content):
    (tmp_path / "update-state.json").write_text(content)
    (tmp_path / "probation.json").write_text(content)
    assert statefile.read_state(str(tmp_path)) is None
    assert statefile.read_marker(str(tmp_path)) == {}  # "cannot tell": repair drops it without guessing
