"""The size-versus-quality frontier of a search's trials and the recommendation for a floor (frontend.trials)."""

from __future__ import annotations

from frontend import charts
from frontend.trials import TrialPoint, frontier, recommendation, trial_points


def _results(*trials: tuple[int, float]) -> dict:
    rows = [
        {"number": n, "preset": "fp8-dynamic", "change": f"change {n}", "size_bytes": size, "recovery": recovery}
        for n, (size, recovery) in enumerate(trials, start=1)
    ]
    return {"settings": {"search": {"trials": rows, "chosen": 2, "floor_percent": 99.0}}}


def test_the_frontier_keeps_only_the_trials_nothing_beats_on_both_size_and_quality():
    points = trial_points(7, _results((164e6, 97.5), (166e6, 98.9), (170e6, 98.0), (180e6, 99.2)))
    assert [p.label for p in points] == ["#7 t1", "#7 t2", "#7 t3", "#7 t4"] and points[1].chosen
    # t3 is larger than t2 and worse: off the frontier
    assert [p.label for p in frontier(points)] == ["#7 t1", "#7 t2", "#7 t4"]


def test_the_recommendation_is_the_smallest_point_that_keeps_the_floor():
    points = [TrialPoint("a", 200, 99.5), TrialPoint("b", 150, 99.0), TrialPoint("c", 120, 98.9)]
    assert recommendation(points, 99.0).label == "b"
    assert recommendation(points, 99.9) is None and recommendation(points, None) is None


def test_the_chart_draws_the_frontier_and_the_floor():
    points = [charts.Point("t1", 164_000_000, 97.5), charts.Point("t2", 170_000_000, 99.1, recommended=True)]
    svg = str(charts.size_quality_chart(points, frontier=points, floor=99.0))
    assert '<polyline class="frontier"' in svg and 'class="floor"' in svg and "floor 99 %" in svg
    assert 'class="point point-recommended"' in svg
