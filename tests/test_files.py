"""Logs read back after a kill (harness/files.py): a last line cut mid-write is left out, nothing else."""

import json

import pytest

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import read_log, trim_log

RECORDS = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30, 40)]


def _log(path, records, cut: int = 0):
    """``records`` as a training loop appends them; ``cut``: characters a kill took off the end."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text[: len(text) - cut] if cut else text)
    return path


def test_trim_log_keeps_each_line_up_to_the_step_as_it_was(tmp_path):
    log = _log(tmp_path / "log.jsonl", RECORDS)
    lines = log.read_text().splitlines()
    trim_log(log, 20)
    assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"
    trim_log(log, 0)
    assert log.read_text() == ""


@pytest.mark.parametrize("cut", [1, 5, len(json.dumps(RECORDS[-1]))])  # the newline, mid-record, all but "{"
def test_a_last_line_cut_by_a_kill_is_left_out(tmp_path, cut):
    log = _log(tmp_path / "log.jsonl", RECORDS, cut)
    if cut == 1:  # only the newline lost: the record is whole and stays
        assert read_log(log) == RECORDS
    else:
        assert read_log(log) == RECORDS[:3]
    trim_log(log, 40)  # resuming from the last checkpoint: the cut line goes, the file ends in a newline
    assert read_log(log) == (RECORDS if cut == 1 else RECORDS[:3])
    assert log.read_text().endswith("\n")


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(RECORDS[0]) + "\n{\"step\": 2\n" + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(UsageError, match=r"log.jsonl, line 2, is not valid JSON"):
        read_log(log)
    with pytest.raises(UsageError, match="line 2"):
        trim_log(log, 100)


def test_no_log_is_no_records(tmp_path):
    assert read_log(tmp_path / "none.jsonl") == []
    trim_log(tmp_path / "none.jsonl", 3)
    assert not (tmp_path / "none.jsonl").exists()


def test_trim_log_by_another_field(tmp_path):
    """Meta-RL logs count iterations, not steps."""
    log = _log(tmp_path / "log.jsonl", [{"iteration": i} for i in (1, 2, 3)], cut=4)
    trim_log(log, 1, key="iteration")
    assert read_log(log) == [{"iteration": 1}]
