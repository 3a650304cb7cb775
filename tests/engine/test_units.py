"""engine.units: how every screen, log line and message writes a size and a duration (one function each)."""

from __future__ import annotations

import pytest

from engine.units import duration_text, size_text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, ""),
        (8, "8 s"),
        (59.6, "1 min"),
        (245, "4 min 05 s"),
        (600, "10 min"),
        (3720, "1 h 02 min"),
        (6 * 3600, "6 h"),
        (6 * 3600 + 600, "6 h 10 min"),
    ],
)
def test_a_duration_reads_in_the_largest_units_leaving_zero_parts_out(seconds, text):
    assert duration_text(seconds) == text


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [(None, "—"), (999, "999 B"), (1200, "1.2 kB"), (163_200_000, "163.2 MB"), (2_690_000_000, "2.69 GB")],
)
def test_a_size_reads_in_decimal_units(num_bytes, text):
    assert size_text(num_bytes) == text


def test_a_time_limit_is_written_with_them():
    from jobs.services.lifecycle import time_limit_error

    assert time_limit_error(6 * 3600) == "The job ran into its time limit of 6 h and was stopped."
    assert "time limit of 10 min" in time_limit_error(600) and "time limit of 8 s" in time_limit_error(8)
