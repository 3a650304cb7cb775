"""One home for a job request's fields: JobInput maps onto the Job record, the API and the form, and each
mapping is the inverse of the other (so "clone and edit" starts from exactly the old request)."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.inputs import JobInput, api_calibration
from jobs.models import CalibrationDataset, Job


@pytest.fixture
def request_of_every_field(make_user) -> JobInput:
    """A request where no field has its default value."""
    alice = make_user("alice")
    dataset = CalibrationDataset.objects.create(owner=alice, name="rows", file="calibration/x.jsonl", sha256="0" * 64)
    request = JobInput(
        model="smollm2-135m-instruct",
        revision="",  # the form keeps a revision only for hub models
        preset="w4a16-gptq",
        recipe_yaml="",
        calibration_kind="upload",
        calibration_file=dataset,
        calibration_hub_dataset="",
        calibration_split="validation",
        calibration_column="content",
        calibration_samples=8,
        calibration_max_seq_len=128,
        evaluation={"offline": False, "tasks": ["arc_easy"], "limit": 5, "backend": "vllm"},
        ignore_indivisible=True,
        priority=3,
        device_class="cpu",
    )
    defaults = JobInput()
    assert [f.name for f in dataclasses.fields(JobInput) if getattr(request, f.name) == getattr(defaults, f.name)] == [
        "model",
        "revision",
        "recipe_yaml",
        "calibration_hub_dataset",
        "gpus",  # a CPU job asks for no GPU
        "search",  # one compression (the search's fields have tests of their own: tests/jobs/test_jobs_search.py)
    ]
    return request


def test_the_job_record_keeps_every_field(request_of_every_field):
    owner = request_of_every_field.calibration_file.owner
    job = Job.objects.create(owner=owner, **request_of_every_field.job_fields())

    assert JobInput.from_job(Job.objects.get(pk=job.pk)) == request_of_every_field


def test_the_api_shape_round_trips(request_of_every_field, rf):
    from jobs.api.serializers import JobCreateSerializer

    request = request_of_every_field
    owner = request.calibration_file.owner
    job = Job.objects.create(owner=owner, **request.job_fields())
    http = rf.post("/api/v1/jobs/")
    http.user = owner
    body = {
        "model": request.model,
        "preset": request.preset,
        "calibration": api_calibration(job),
        "evaluation": request.evaluation,
        "ignore_indivisible": request.ignore_indivisible,
        "priority": request.priority,
        "device_class": request.device_class,
    }
    serializer = JobCreateSerializer(data=body, context={"request": http})

    assert serializer.is_valid(), serializer.errors
    assert serializer.to_job_input() == request


def test_clone_and_edit_form_starts_from_the_old_request(request_of_every_field):
    from frontend.forms import JobForm

    request = request_of_every_field
    owner = request.calibration_file.owner
    form = JobForm(
        JobForm.initial_from(request),
        user=owner,
        calibration_datasets=CalibrationDataset.objects.filter(owner=owner),
    )

    assert form.is_valid(), form.errors
    assert form.to_job_input() == request
