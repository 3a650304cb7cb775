"""The admin for operators: the queue page reconciles the broker with the database and reads in one glance,
the job page shows results and manifest as tables, and the admin's home page leads to the queue page."""

from __future__ import annotations

import re

import pytest

from jobs.models import Job

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client, make_user):
    client.force_login(make_user("root", is_staff=True, is_superuser=True))
    return client


def _queue_row(html: str, name: str) -> list[str]:
    table = html[html.index('id="queue-counts"') :]
    row = re.search(rf"<tr>\s*<td>{name}</td>(.*?)</tr>", table, re.S).group(1)
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td>(.*?)</td>", row, re.S)]


def test_queue_page_explains_broker_messages_that_belong_to_no_waiting_job(operator, user):
    from compressor_app.celery import app

    # Given two messages in the gpu queue whose jobs no longer wait (cancelled after they were queued)
    with app.connection_for_write() as conn:
        for _ in range(2):
            app.send_task("jobs.tasks.run_job", args=[0], queue="gpu", connection=conn)
    try:
        page = operator.get("/admin/jobs/job/queue/")
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge("gpu")

    # Then the page does not leave "gpu 2" beside "No job is waiting": it counts both sides and says why
    waiting, messages, note = _queue_row(page.text, "gpu")
    assert (waiting, messages) == ("0", "2")
    assert "2 message(s) belong to no waiting job" in note


def test_queue_page_explains_waiting_jobs_without_a_message(operator, user, make_job):
    make_job(user, queue="cpu")
    waiting, messages, note = _queue_row(operator.get("/admin/jobs/job/queue/").text, "cpu")
    assert (waiting, messages) == ("1", "0") and "have no message in the broker" in note


def test_queue_page_shows_the_workers_as_they_last_reported_and_asks_them_only_on_the_button(operator, user, make_job):
    from engine.resources import MB, WorkerCaps, WorkerResources
    from jobs import nodes

    # Given a registered worker running a job
    resources = WorkerResources(8_000 * MB, 50_000 * MB)
    nodes.node_announce(hostname="gpu0@host", queues=["gpu"], resources=resources, caps=WorkerCaps())
    running = make_job(user, status=Job.Status.RUNNING, worker="gpu0@host", stage="calibrating")

    # When an operator opens the queue page, its workers table is there at once, from the registry and the
    # database (nobody waits for the workers to answer), with a button that asks them
    page = operator.get("/admin/jobs/job/queue/").text
    rows = {cells[0]: cells for cells in _table_rows(page, "workers-table")}
    assert rows["gpu0@host"][2].startswith("online") and f"Job {running.pk}" in rows["gpu0@host"][7]
    assert "As the workers last reported" in page and "Asking the workers" not in page
    assert 'id="ask-workers" href="/admin/jobs/job/queue/workers/"' in page

    # The button's answer: the table as the workers answer now (a fragment for the script, a page without it)
    fragment = operator.get("/admin/jobs/job/queue/workers/", HTTP_X_REQUESTED_WITH="fetch")
    assert fragment.status_code == 200 and 'id="workers-table"' in fragment.text and "<html" not in fragment.text
    assert "As the workers answered at" in fragment.text
    full = operator.get("/admin/jobs/job/queue/workers/")
    assert "<html" in full.text and 'id="workers-table"' in full.text


def test_the_workers_table_lists_every_registered_node_with_its_resources_and_current_job(operator, user, make_job):
    from engine.resources import MB, Gpu, WorkerCaps, WorkerResources
    from jobs import nodes

    # Given a GPU node that is online and runs a job, and a CPU node that shut down (its own queue has a job)
    gpu = WorkerResources(80_000 * MB, 500_000 * MB, gpus=(Gpu(0, "NVIDIA H100 80GB HBM3", 79_000 * MB),))
    nodes.node_announce(hostname="gpu0@node-a", queues=["gpu", "node.gpu0@node-a"], resources=gpu, caps=WorkerCaps())
    small = WorkerResources(900 * MB, 2_000 * MB, capped=("host_ram",))
    nodes.node_announce(hostname="cpu@node-b", queues=["cpu"], resources=small, caps=WorkerCaps(host_ram_mb=900))
    nodes.node_offline(hostname="cpu@node-b")
    running = make_job(user, status=Job.Status.RUNNING, worker="gpu0@node-a", stage="calibrating", queue="gpu")
    make_job(user, queue="node.cpu@node-b")

    # When an operator opens the workers table (no worker answers the broker's question here)
    html = operator.get("/admin/jobs/job/queue/workers/", HTTP_X_REQUESTED_WITH="fetch").text
    rows = {cells[0]: cells for cells in _table_rows(html, "workers-table")}

    # Then both nodes are there with what they announced, their state and what they run
    machine, state, gpus, ram, disk, queues, runs = rows["gpu0@node-a"][1:]
    assert state.startswith("online") and gpus == "1: NVIDIA H100 80GB HBM3 (79.00 GB free)"
    assert (ram, disk, queues) == ("80.00 GB", "500.00 GB", "gpu, node.gpu0@node-a") and f"Job {running.pk}" in runs
    machine, state, gpus, ram, disk, queues, runs = rows["cpu@node-b"][1:]
    assert state.startswith("offline") and (gpus, ram, runs) == ("none", "900.0 MB (capped)", "idle")
    # ...and the queue counts include the node's own queue
    waiting, messages, _note = _queue_row(operator.get("/admin/jobs/job/queue/").text, "node.cpu@node-b")
    assert (waiting, messages) == ("1", "0")


def test_an_operator_forgets_a_node_that_is_gone_for_good(operator):
    from engine.resources import MB, WorkerCaps, WorkerResources
    from jobs import nodes
    from jobs.models import WorkerNode

    # Given a registered node, listed with its figures
    gone = nodes.node_announce(
        hostname="cpu@old-box", queues=["cpu"], resources=WorkerResources(900 * MB, 2_000 * MB), caps=WorkerCaps()
    )
    listing = operator.get("/admin/jobs/workernode/").text
    assert "cpu@old-box" in listing and "900.0 MB" in listing

    # When the operator deletes it, routing no longer counts it
    operator.post(f"/admin/jobs/workernode/{gone.pk}/delete/", {"post": "yes"})
    assert not WorkerNode.objects.exists()


def _table_rows(html: str, table_id: str) -> list[list[str]]:
    table = html[html.index(f'id="{table_id}"') :]
    body = table[table.index("<tbody>") : table.index("</tbody>")]
    return [
        [" ".join(re.sub(r"<[^>]+>", "", cell).split()) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)
    ]


def test_job_change_page_shows_results_and_manifest_as_tables(operator, user, make_job):
    job = make_job(
        user,
        status=Job.Status.SUCCEEDED,
        results={
            "size_before_bytes": 269060096,
            "layer_errors": [{"module": f"model.layers.{i}.mlp.down_proj", "error": 0.5 + i} for i in range(40)],
            "evaluation": {"metrics": [{"name": "perplexity", "baseline": 12.84, "compressed": 13.1}]},
        },
        manifest={"files": [{"path": "model.safetensors", "size": 163, "sha256": "ab" * 32}]},
    )

    html = operator.get(f"/admin/jobs/job/{job.pk}/change/").text

    assert '{"size_before_bytes"' not in html and "&quot;size_before_bytes&quot;" not in html
    assert "<th>size_before_bytes</th><td>269060096</td>" in html
    assert "<td>model.layers.0.mlp.down_proj</td>" in html and "10 more rows" in html
    assert "<th>path</th><th>size</th><th>sha256</th>" in html and f"<td>{'ab' * 32}</td>" in html


def test_admin_home_links_to_the_queue_page(operator):
    assert 'href="/admin/jobs/job/queue/"' in operator.get("/admin/").text


def test_every_page_numbers_the_queue_the_same_way(user, make_job):
    from django.utils import timezone

    from jobs import selectors

    # Given waiting jobs with ties on priority and on submission time, in two queues
    now = timezone.now()
    wanted = ((5, "gpu"), (9, "gpu"), (5, "gpu"), (5, "cpu"), (0, "gpu"))
    jobs = [make_job(user, priority=p, queue=q) for p, q in wanted]
    Job.objects.filter(pk__in=[j.pk for j in jobs]).update(created_at=now)

    # Then the one-job count (job page, API) and the whole-queue numbering (lists, admin) agree
    positions = selectors.queue_positions()
    for job in Job.objects.filter(pk__in=[j.pk for j in jobs]):
        assert selectors.queue_position(job=job) == positions[job.pk]
    assert [positions[j.pk] for j in jobs] == [2, 1, 3, 1, 4]


def test_the_preset_filter_names_every_link_and_custom_recipes_filter_too(operator, user, make_job):
    fp8 = make_job(user, preset="fp8-dynamic")
    custom = make_job(user, preset="", recipe_yaml="quant_stage: {}")

    html = operator.get("/admin/jobs/job/").text
    links = re.findall(r'<a href="\?preset=([^"]*)"[^>]*>([^<]*)</a>', html)

    assert ("custom", "custom recipe") in links and ("fp8-dynamic", "fp8-dynamic") in links
    assert all(name.strip() for _value, name in links)
    listed = operator.get("/admin/jobs/job/?preset=custom").text
    assert f"/admin/jobs/job/{custom.pk}/change/" in listed and f"/admin/jobs/job/{fp8.pk}/change/" not in listed


def test_the_admin_home_names_hub_pushes_in_plain_english(operator):
    html = operator.get("/admin/").text
    assert ">Hub pushes</a>" in html and "pushs" not in html
