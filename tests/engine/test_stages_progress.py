"""Progress through calibration: every pass of every calibrating modifier reports its layers, and the percent
moves with the layer times the run measures (engine.stages.Reporter.layer)."""

from __future__ import annotations

import time

from engine.presets import PRESETS, recipe_calibrating_modifiers
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec
from engine.stages import Reporter

LAYERS = 4
PASSES = ["SmoothQuantModifier", "GPTQModifier"]


def test_a_smoothquant_job_reports_the_layers_of_both_passes_and_its_progress_never_stops_or_goes_back(
    tiny_model_with_layers, tmp_path
):
    # Given the smoothquant preset, whose recipe calibrates in two passes (SmoothQuant, then GPTQ)
    assert recipe_calibrating_modifiers(PRESETS["smoothquant-int8-w8a8"].recipe_yaml()) == PASSES
    spec = CompressionSpec(
        model=str(tiny_model_with_layers(LAYERS)),
        preset="smoothquant-int8-w8a8",
        calibration=CalibrationSpec(samples=4, max_seq_len=32),
    )
    events = []

    # When it runs
    compress(spec, tmp_path / "ckpt", progress=lambda event: event.log_line is None and events.append(event))

    # Then each layer of each pass is reported, the pass named
    layers = [event for event in events if event.message.startswith("Layer")]
    assert [event.message for event in layers] == [
        f"Layer {i} of {LAYERS}, pass {n} of 2 ({name})"
        for n, name in ((1, "SmoothQuant"), (2, "GPTQ"))
        for i in range(1, LAYERS + 1)
    ]
    assert [(event.step, event.total) for event in layers] == [(i, LAYERS) for i in range(1, LAYERS + 1)] * 2
    # ...the percent grows at every layer of both passes, and never goes back over the whole run
    fractions = [event.fraction for event in layers]
    assert all(later > earlier for earlier, later in zip(fractions, fractions[1:], strict=False)), fractions
    overall = [event.fraction for event in events]
    assert overall == sorted(overall) and overall[-1] == 1.0
    # ...and the first pass does not take the whole of calibration's share: the GPTQ pass has room to move
    assert fractions[LAYERS] < 0.9


def test_the_percent_follows_the_measured_layer_times_and_a_slower_second_pass_slows_it_without_freezing():
    # Given a run of two passes over 10 layers whose second pass is three times slower than the first
    reporter_events = []
    reporter = Reporter(reporter_events.append, None)
    reporter.plan(CompressionSpec(), needs_calibration=True, passes=2)
    started = time.monotonic()
    reporter.emit("calibrating", "Running llm-compressor")
    reached = []
    for pass_index, seconds in ((0, 0.03), (1, 0.09)):
        for index in range(10):
            reporter.layer(index, 10, pass_index, PASSES)
            reached.append(time.monotonic())
            time.sleep(seconds)
    reporter.emit("saving", "Writing the compressed checkpoint")
    reporter.emit("done")

    layers = [event for event in reporter_events if event.message.startswith("Layer")]
    fractions = [event.fraction for event in layers]
    # Then the percent grows at every layer, the slower pass included
    assert all(later > earlier for earlier, later in zip(fractions, fractions[1:], strict=False)), fractions
    # ...in the first pass, the time left the page derives (time so far x share to do / share done) is what
    # the pace measured so far says: the rest of this pass and a second pass at that pace, within 30 %
    for index in range(2, 10):
        implied = (reached[index] - started) * (1 - fractions[index]) / fractions[index]
        pace = (reached[index] - reached[0]) / index
        expected = pace * (10 - index) + pace * 10
        assert abs(implied - expected) < 0.3 * expected, (index, implied, expected)
    # ...and the stages after calibration continue from where the layers left the bar, never back
    after = [event.fraction for event in reporter_events[len(layers) + 1 :]]
    assert after == sorted(after) and after[0] >= fractions[-1] and after[-1] == 1.0
