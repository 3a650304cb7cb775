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


BOUNDED = [  # (engine.limits' bound, the form's field, the API's field)
    ("CALIBRATION_SAMPLES", "calibration_samples", ("calibration", "samples")),
    ("CALIBRATION_MAX_SEQ_LEN", "calibration_max_seq_len", ("calibration", "max_seq_len")),
    ("EVALUATION_LIMIT", "evaluation_limit", ("evaluation", "limit")),
    ("SEARCH_MAX_TRIALS", "search_max_trials", ("search", "budget", "max_trials")),
    ("PRIORITY", "priority", ("priority",)),
]


@pytest.mark.parametrize(("bound", "form_field", "api_path"), BOUNDED)
def test_the_form_and_the_api_offer_and_accept_what_engine_limits_says(bound, form_field, api_path):
    from engine import limits
    from frontend.forms import JobForm
    from jobs.api.serializers import JobCreateSerializer

    expected = getattr(limits, bound)
    field = JobForm.base_fields[form_field]
    assert (field.initial, field.min_value, field.max_value) == (expected.default, expected.least, expected.most)
    serializer_field = JobCreateSerializer()
    for name in api_path:
        serializer_field = serializer_field.fields[name]
    assert (serializer_field.default, serializer_field.min_value, serializer_field.max_value) == (
        expected.default,
        expected.least,
        expected.most,
    )


@pytest.mark.django_db
def test_a_request_that_names_no_sizes_gets_the_same_defaults_everywhere(make_user):
    from engine.cli import build_parser
    from engine.limits import CALIBRATION_MAX_SEQ_LEN, CALIBRATION_SAMPLES, PRIORITY, SEARCH_MAX_TRIALS

    expected = (CALIBRATION_SAMPLES.default, CALIBRATION_MAX_SEQ_LEN.default)
    job = Job(owner=make_user("bob"))
    spec = JobInput(preset="int8-w8a8-gptq").to_spec()
    cli = build_parser().parse_args(["--preset", "int8-w8a8-gptq"])
    assert (job.calibration_samples, job.calibration_max_seq_len) == expected
    assert (spec.calibration.samples, spec.calibration.max_seq_len) == expected
    assert (cli.samples, cli.max_seq_len, cli.max_trials) == (*expected, SEARCH_MAX_TRIALS.default)
    assert job.priority == JobInput().priority == PRIORITY.default
