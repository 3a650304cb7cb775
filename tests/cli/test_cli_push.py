"""`compressor push` as a real process against a live server, its light worker and the local hub: a succeeded
job's checkpoint followed to the hub, and the one-line answers for a refused token, a missing one and a job
that is not the user's."""

from __future__ import annotations

import re
import uuid

import pytest

from jobs import hub_tokens
from jobs.models import HubPush

pytestmark = pytest.mark.django_db(transaction=True)

FILES = {"model.safetensors": bytes(range(256)) * 2000, "config.json": b"{}", "README.md": b"# card\n"}


@pytest.fixture
def done_job(cli_user, make_job, checkpoint):
    job = make_job(cli_user)
    checkpoint(job, FILES)
    return job


def test_a_push_without_a_hub_token_or_of_another_users_job_is_one_line(compressor, done_job, make_user, make_job):
    theirs = make_job(make_user("dave"))

    no_token = compressor("push", str(done_job.pk), "carol/model")
    not_mine = compressor("push", str(theirs.pk), "carol/model")

    assert no_token.code == 3 and no_token.err.count("\n") == 1, no_token.err
    assert no_token.err.startswith("compressor: Refused (400): token: Set your hub token first")
    assert not_mine.code == 3 and f"there is no job {theirs.pk} of yours" in not_mine.err
    assert not HubPush.objects.exists()


# Last in the module: its worker (module-scoped) starts here.
def test_a_push_is_followed_to_the_hub_and_a_refused_token_exits_1_saying_so(
    cli_worker, compressor, cli_user, done_job, hub
):
    # Given carol's token of the hub, stored on the server
    token = hub.add_user("carol-hub")
    hub_tokens.hub_token_set(owner=cli_user, token=token)
    repo_id = f"carol-hub/pushed-{uuid.uuid4().hex[:6]}"

    # When she pushes her job with --follow
    run = compressor("push", str(done_job.pk), repo_id, "--follow", "--interval", "0.2", timeout=120)

    # Then it waited for the light worker and printed the commit's link; the hub holds the checkpoint
    assert run.code == 0, run.out + run.err + "\n" + cli_worker.log_tail()
    assert re.search(rf"^Push \d+ of job {done_job.pk} to {repo_id} is queued\.$", run.out, re.M), run.out
    commit = hub.repos[repo_id].branches["main"]
    assert f"Pushed to {repo_id}: {hub.endpoint}/{repo_id}/commit/{commit}" in run.out
    stored = hub.repos[repo_id].commits[commit]
    assert {name: blob.read(0, blob.size) for name, blob in stored.items() if name in FILES} == FILES
    assert hub.repos[repo_id].private and token not in run.out + run.err

    # When her stored token is one the hub refuses
    hub_tokens.hub_token_set(owner=cli_user, token=f"hf_{uuid.uuid4().hex}revoked")
    refused = compressor("push", str(done_job.pk), f"carol-hub/again-{uuid.uuid4().hex[:6]}", "--follow", timeout=120)

    # Then it exits 1 with the reason on one line
    assert refused.code == 1, refused.out + refused.err
    assert refused.err.startswith("Push to carol-hub/again-") and "refused your token (401)" in refused.err
    assert refused.err.count("\n") == 1
