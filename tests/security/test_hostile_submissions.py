"""Job fields other than the recipe, as an attacker fills them: a 400 naming the field, nothing stored."""

from __future__ import annotations

import pytest

from jobs.models import Job

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("revision", ["../../etc", "$(id)", "a" * 200, "main"])
def test_a_revision_for_the_built_in_model_is_a_400_naming_the_revision(api, revision):
    body = {"model": "smollm2-135m-instruct", "revision": revision, "preset": "fp8-dynamic"}

    response = api.post("/api/v1/jobs/", body, format="json")

    assert response.status_code == 400, response.content
    assert list(response.json()) == ["revision"], response.json()
    assert not Job.objects.exists()


@pytest.mark.parametrize("revision", ["../../etc", "$(id)", "a" * 201])
def test_a_hub_models_revision_follows_the_same_rule(api, revision):
    body = {"model": "some-org/some-model", "revision": revision, "preset": "fp8-dynamic"}

    response = api.post("/api/v1/jobs/", body, format="json")

    assert response.status_code == 400, response.content
    assert list(response.json()) == ["revision"], response.json()
