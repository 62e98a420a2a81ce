"""How counts and durations read."""

from __future__ import annotations

from worker import wording


def test_a_tally_names_files_only_when_there_are_some() -> None:
    """A table destination's summary says rows; a files destination's says rows and files."""
    assert wording.tally(1000, 0) == "1,000 rows"
    assert wording.tally(1, 3) == "1 row, 3 files"


def test_durations_read_like_a_person_says_them() -> None:
    """Seconds under a minute with a decimal, then minutes and seconds."""
    assert wording.format_duration(15.94) == "15.9s"
    assert wording.format_duration(66) == "1m 6s"
