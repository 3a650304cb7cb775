"""The job page's charts, drawn on the server: what a reader needs to read them (axes with names, a log
scale where outliers would flatten everything else, each metric on its own axis, the module under the mouse)."""

from __future__ import annotations

import re

from frontend.charts import layer_error_chart, metric_chart
from frontend.presentation import MetricRow


def _bar_heights(svg: str) -> list[float]:
    return [float(h) for h in re.findall(r'<rect class="bar[^"]*" [^>]*height="([0-9.]+)"', svg)]


def test_layer_chart_keeps_every_module_visible_beside_outliers():
    # Given 207 modules with small errors and three outliers 1000x larger, as a GPTQ run of the built-in model
    errors = [(f"model.layers.{i // 7}.mlp.down_proj", 0.5 + (i % 5) * 0.1) for i in range(207)]
    errors += [
        ("model.layers.29.mlp.down_proj", 1814.2),
        ("model.layers.28.mlp.down_proj", 1252.0),
        ("model.layers.27.mlp.down_proj", 545.98),
    ]

    svg = str(layer_error_chart(errors))

    # Then no bar is invisible (a linear scale made ~200 of them under a pixel) and the scale says so
    heights = _bar_heights(svg)
    assert len(heights) == 210
    plot = max(heights)
    assert min(heights) > plot / 10, "the small errors are drawn too small to see beside the outliers"
    assert "log scale" in svg
    # ...both axes are named, the y axis has ticks by powers of ten, and the x axis numbers the layers
    assert re.search(r'class="label axis-label"[^>]*>layer \(', svg)
    assert re.search(r'class="label axis-label"[^>]*rotate\(-90[^>]*>error, no unit \(log scale\)', svg)
    ticks = re.findall(r'<text class="tick"[^>]*text-anchor="end">([^<]+)</text>', svg)
    assert ticks[0] == "0.1" and ticks[-1] == "10000"
    # ...and hovering a bar names its module and its full value
    assert "<title>model.layers.29.mlp.down_proj: 1814</title>" in svg


def test_layer_chart_draws_zero_errors_as_a_sliver_not_a_crash():
    svg = str(layer_error_chart([("model.layers.0.self_attn.q_proj", 0.0), ("model.layers.0.mlp.up_proj", 3.2)]))
    assert all(height >= 1 for height in _bar_heights(svg))


def test_layer_chart_escapes_module_names():
    svg = str(layer_error_chart([("<script>x</script>", 1.0)]))
    assert "<script>" not in svg and "&lt;script&gt;" in svg


def test_metric_chart_gives_each_metric_its_own_axis_and_direction():
    # Given perplexity (lower is better), a KL divergence whose baseline is 0 by definition, and agreement
    rows = [
        MetricRow("perplexity", "Perplexity (held-out text)", 12.8, 13.1, 97.7, False),
        MetricRow("kl_divergence", "KL divergence from the baseline", 0.0, 0.027, None, False, against_baseline=True),
        MetricRow("top1_agreement", "Next-token agreement", 1.0, 0.96, None, True, against_baseline=True),
    ]

    svg = str(metric_chart(rows))

    # Then each metric says which way is better
    assert svg.count("lower is better") == 2 and svg.count("higher is better") == 1
    # ...each panel has an axis with its own ticks from 0 (perplexity to 15, KL to 0.03, agreement to 1)
    axis_ticks = re.findall(r'class="tick axis-tick"[^>]*>([^<]+)</text>', svg)
    assert axis_ticks == ["0", "7.5", "15", "0", "0.015", "0.03", "0", "0.5", "1"]
    # ...and the two measured against the baseline itself draw no baseline bar (KL's would be empty, the
    # agreement's a full one that measured nothing), only a note of its value by definition
    assert svg.count('class="bar-baseline" x="190"') == 1
    assert "baseline: 0 by definition" in svg and "baseline: 1.000 by definition" in svg
    # ...its compressed bar is read on its axis: 0.027 of 0.03
    kl_bar = re.findall(r'<rect class="bar-compressed" x="190" y="[0-9.]+" width="([0-9.]+)"', svg)[1]
    assert abs(float(kl_bar) / 480 - 0.9) < 0.01
    # ...and each bar's value is written beside its name, before the bar (on a phone, on screen unscrolled)
    values = re.findall(r'text-anchor="end">(baseline|compressed) <tspan class="value">([^<]+)</tspan>', svg)
    assert values == [
        ("baseline", "12.80"),
        ("compressed", "13.10"),
        ("compressed", "0.02700"),
        ("compressed", "0.9600"),
    ]


def test_layer_chart_tells_each_modules_kind_by_colour_without_a_mouse():
    # Given two layers of a Llama's seven kinds of module
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    errors = [(f"model.layers.{layer}.{kind}", 1.0 + i) for layer in range(2) for i, kind in enumerate(kinds)]

    svg = str(layer_error_chart(errors))

    # Then a legend names each kind beside its colour, and every bar has its kind's colour
    short = [kind.rsplit(".", 1)[-1] for kind in kinds]
    legend = re.findall(r'<rect class="kind-(\d)"[^>]*/><text class="tick"[^>]*>([a-z_]+)</text>', svg)
    assert [name for _colour, name in legend] == short
    colour = {name: index for index, name in legend}
    bars = re.findall(r'<rect class="bar kind-(\d)"[^>]*><title>model\.layers\.\d\.[a-z_]+\.([a-z_]+):', svg)
    assert len(bars) == 14 and all(colour[name] == index for index, name in bars)
    # ...and the description read out says so; one kind alone gets neither legend nor colours
    assert "coloured by its kind of module: q_proj, k_proj" in svg
    single = str(layer_error_chart([("model.layers.0.mlp.down_proj", 1.0), ("model.layers.1.mlp.down_proj", 2.0)]))
    assert "kind-" not in single
