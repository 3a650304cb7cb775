"""Custom recipes an attacker (or a careless paste) sends: each is a 400 naming the recipe, in words, before
anything is queued; never a 500, never a worker pinned by a pattern."""

from __future__ import annotations

import json

import pytest

from jobs.models import Job

pytestmark = pytest.mark.django_db


def _recipe(modifier: str) -> str:
    return f"compression_stage:\n  compression_modifiers:\n    {modifier}\n"


# Values PyYAML's safe loader reads into something no modifier takes, or fails to read with a Python error.
UNREADABLE = [
    ("an integer of 5,000 digits", "a: " + "1" * 5000 + "\n", "cannot read as a number"),
    ("a sexagesimal float too large for a float", "a: 1" + ":59" * 3000 + ".5\n", "cannot read as a number"),
    ("binary data", _recipe("QuantizationModifier: {scheme: !!binary aGVsbG8=, targets: [Linear]}"), "!!binary"),
    ("a set", _recipe("QuantizationModifier: {scheme: W8A16, targets: !!set {Linear}}"), "!!set"),
    ("ordered pairs", _recipe("QuantizationModifier: {scheme: W8A16, targets: !!omap [x: 1]}"), "!!omap"),
    ("a date", _recipe("QuantizationModifier: {scheme: W8A16, targets: 2001-12-14}"), "a date"),
    ("an infinite float", _recipe("QuantizationModifier: {scheme: W8A16, start: 1.0e+999999}"), "inf"),
    ("a 19-digit integer", _recipe("QuantizationModifier: {scheme: W8A16, start: 9999999999999999999}"), "18 digits"),
    ("a key that is a number", "1: 2\n", "keys are names"),
]


@pytest.mark.parametrize(("name", "recipe", "expected"), UNREADABLE, ids=[case[0] for case in UNREADABLE])
def test_a_recipe_value_yaml_cannot_read_plainly_is_a_400_naming_the_recipe(api, name, recipe, expected):
    response = api.post("/api/v1/jobs/", {"recipe_yaml": recipe}, format="json")

    assert response.status_code == 400, (name, response.content)
    assert expected in json.dumps(response.json()["recipe_yaml"]), response.json()
    assert "sys.set_int_max_str_digits" not in response.content.decode()  # Python's hint is not the message
    assert not Job.objects.exists()


def test_the_form_answers_a_huge_integer_beside_the_recipe_field(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    form = {
        "model_source": "builtin",
        "builtin_model": "smollm2-135m-instruct",
        "preset": "custom",
        "recipe_yaml": "a: " + "1" * 5000 + "\n",
        "calibration_kind": "builtin",
        "calibration_split": "train",
        "calibration_column": "text",
        "calibration_samples": "8",
        "calibration_max_seq_len": "128",
        "priority": "5",
        "device_class": "cpu",
    }

    response = client.post("/jobs/new/", form)

    assert response.status_code == 400
    assert 'id="recipe_yaml-error"' in response.content.decode()
    assert "cannot read as a number" in response.content.decode()
    assert not Job.objects.exists()
