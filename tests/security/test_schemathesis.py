"""schemathesis against /api/v1/schema/ of a live test server, as two users with their own tokens and objects.

Every operation is called with schema-conforming and with schema-violating data (a few examples each, from a
fixed seed): no server error, violating data refused, no operation answers without credentials, every answer
matches its documented schema. Then workflows (schemathesis' state machine, its links inferred from the schema:
create an upload or a job, read it, cancel, retry, delete it, read it again) as each user in turn, whose ids
are drawn from both users' objects: the same checks, and each answer's status and content type documented.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    use_after_free,
)
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from tests.support import QUEUES

CHECKS = [not_a_server_error, negative_data_rejection, ignored_auth, use_after_free, response_schema_conformance]
STATEFUL_CHECKS = [*CHECKS, status_code_conformance, content_type_conformance]
FILES = ("config.json", "model.safetensors", "manifest.json")

# A few examples per operation and mode: the run stays within a minute or two on a loaded machine.
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "5"))
# Workflows per user and their most steps.
STATEFUL_EXAMPLES = int(os.environ.get("SCHEMATHESIS_STATEFUL_EXAMPLES", "20"))
STATEFUL_STEPS = int(os.environ.get("SCHEMATHESIS_STATEFUL_STEPS", "8"))


@pytest.fixture
def no_compression_consumers() -> Iterator[None]:
    """This session's workers (if any) stop taking compression jobs while jobs are submitted at random.

    The jobs stay queued and are removed afterwards; broadcasts reach only this session's workers (its
    broker key prefix), and a session without workers gets no replies and loses nothing.
    """
    from compressor_app.celery import app

    compute = [q for q in QUEUES if q != "light"]
    for queue in compute:
        app.control.cancel_consumer(queue, reply=True, timeout=2)
    yield
    with app.connection_for_write() as conn:
        for queue in compute:
            conn.default_channel.queue_purge(queue)
    for queue in compute:
        app.control.add_consumer(queue, reply=True, timeout=2)


@pytest.fixture
def two_users(transactional_db, make_user, make_job, checkpoint) -> dict[str, object]:
    """alice and bob, each with a token, a queued and a succeeded job (with a checkpoint) and an upload."""
    from django.core.files.base import ContentFile
    from rest_framework.authtoken.models import Token

    from jobs.services import storage

    users: dict[str, object] = {"tokens": [], "ids": []}
    for name in ("alice", "bob"):
        user = make_user(name)
        users["tokens"].append(Token.objects.create(user=user).key)
        checkpoint(done := make_job(user))
        queued = make_job(user)
        upload = storage.calibration_dataset_create(
            owner=user, name=f"{name}.jsonl", upload=_named(ContentFile(b'{"text": "a row of text"}\n' * 4))
        )
        users["ids"] += [done.pk, queued.pk, upload.pk]
    return users


def _named(content):
    content.name = "rows.jsonl"
    return content


@pytest.fixture
def api_schema(live_server, two_users, no_compression_consumers, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = schemathesis.openapi.from_url(f"{live_server.url}/api/v1/schema/?format=json", timeout=60)

    @loaded.hook
    def flatmap_path_parameters(context, path_parameters):
        # Random ids hardly ever name an object: also draw the ids of both users' jobs and uploads (and files).
        if not path_parameters or not isinstance(path_parameters.get("id"), int):
            return st.just(path_parameters)
        known = {"id": st.sampled_from(two_users["ids"])}
        if isinstance(path_parameters.get("path"), str):
            known["path"] = st.sampled_from(FILES)
        return st.just(path_parameters) | st.fixed_dictionaries(known).map(lambda ids: {**path_parameters, **ids})

    return loaded


def test_the_api_holds_against_generated_requests(api_schema, two_users):
    failures = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def call(case):
                for token in two_users["tokens"]:
                    case.call_and_validate(headers={"Authorization": f"Token {token}"}, checks=CHECKS, timeout=120)

            try:
                call()
            except Unsatisfiable:  # nothing in this operation can be made invalid
                pass
            except Exception as exc:  # noqa: BLE001 - every operation's failures are reported together
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)


def test_the_api_holds_through_generated_workflows_of_each_user(api_schema, two_users):
    workflows = api_schema.as_state_machine()
    calls: list[tuple[str, str, int]] = []
    for token in two_users["tokens"]:

        class AsOneUser(workflows):
            headers = {"Authorization": f"Token {token}"}

            def get_call_kwargs(self, case):
                return {"headers": self.headers, "timeout": 120}

            def after_call(self, response, case):
                calls.append((self.headers["Authorization"], case.operation.label, response.status_code))

            def validate_response(self, response, case, additional_checks=None, **kwargs):
                case.validate_response(response, checks=STATEFUL_CHECKS, transport_kwargs=kwargs)

        AsOneUser.run(
            settings=settings(
                max_examples=STATEFUL_EXAMPLES,
                stateful_step_count=STATEFUL_STEPS,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
        )
    # Both users ran workflows, and jobs were created on the way (the links then follow them by id)
    assert {auth for auth, _, _ in calls} == {f"Token {token}" for token in two_users["tokens"]}
    assert any(label == "POST /api/v1/jobs/" and status == 201 for _, label, status in calls)
