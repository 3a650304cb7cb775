"""Several machines, for real: two `celery worker` processes on the cpu queue, started with different caps
(COMPRESSOR_WORKER_*), announce different resources; each job lands on a worker that can hold it; a job
that no worker can hold is refused at submission with the figures; a worker that stops goes offline; the
admin's queue page lists both nodes.

The two workers differ so that each holds what the other cannot:
- "roomy": 4 GB of host memory but 150 MB of disk: the tiny model's checkpoint (74 MB with its margin) fits,
  the built-in model's (336 MB) does not;
- "narrow": the disk as measured but 900 MB of host memory: the built-in model, data-free, needs 836 MB to
  hold it whole (engine.plan), the tiny one 508 MB.
Another worker of the session (tests/jobs' live worker, with the machine's real resources) may be online
too: the assertions hold whichever worker that can hold a job takes it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from engine.errors import PreflightError
from engine.plan import plan_memory
from engine.resources import MB
from jobs import nodes
from jobs.models import Job, WorkerNode
from tests.hub_server import Blob, llama_shapes, synthetic_safetensors
from tests.support import LiveWorker, start_worker_process, stop_worker_process, wait_for_worker, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

DATA_FREE = {"preset": "fp8-dynamic", "calibration": {"kind": "none"}, "device_class": "cpu", "force": True}
ROOMY = {"COMPRESSOR_WORKER_HOST_RAM_MB": "4000", "COMPRESSOR_WORKER_DISK_MB": "150"}
NARROW = {"COMPRESSOR_WORKER_HOST_RAM_MB": "900"}
# A Llama-3.1-405B-shaped model: 812 GB of bf16 weights, more than any worker here holds, however measured.
LLAMA_405B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16384,
    "intermediate_size": 53248,
    "num_hidden_layers": 126,
    "num_attention_heads": 128,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


@dataclass
class Pair:
    roomy: LiveWorker
    narrow: LiveWorker


@pytest.fixture(scope="module")
def worker_pair(
    django_db_setup, django_db_blocker, broker, media_root, hub_server, tmp_path_factory, live_worker_process
) -> Iterator[Pair]:
    """Two cpu workers with different caps, a 1 s registry heartbeat and no GPU, for this module only.

    The session's live worker stops taking from the shared queues meanwhile: it allows no local model folders,
    so a tiny-model job it took would fail for a reason that is not this module's (its own queue still works).
    """
    from django.db import connection

    from compressor_app.celery import app

    live_worker_process.pause()

    started: list[LiveWorker] = []
    for label, caps in (("roomy", ROOMY), ("narrow", NARROW)):
        name = f"{label}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        log_path = tmp_path_factory.mktemp(f"{label}-worker") / "worker.log"
        env = worker_env(
            settings_dict=connection.settings_dict,
            broker=broker,
            media_root=media_root,
            COMPRESSOR_NODE_HEARTBEAT_S="1",
            COMPRESSOR_NODE_OFFLINE_AFTER_S="5",
            COMPRESSOR_WORKER_GPUS="0",
            COMPRESSOR_ALLOW_LOCAL_PATHS="True",
            **hub_server.env,
            **caps,
        )
        process = start_worker_process(name=name, queues=["cpu"], log_path=log_path, env=env)
        started.append(LiveWorker(name=name, process=process, log_path=log_path))
    try:
        for worker in started:
            wait_for_worker(worker.process, worker.name, worker.log_path)
        yield Pair(*started)
    finally:
        for worker in started:
            stop_worker_process(worker.process)
        live_worker_process.resume()
        with app.connection_for_write() as conn:
            for queue in ["cpu", *(nodes.own_queue(w.name) for w in started)]:
                conn.default_channel.queue_purge(queue)
        with django_db_blocker.unblock():  # no later test routes jobs by these two
            WorkerNode.objects.filter(hostname__in=[w.name for w in started]).delete()


@pytest.fixture
def pair(worker_pair, transactional_db, wait_for) -> Pair:
    """The pair, registered: each test starts with an empty database, and each worker announces itself again
    at its next heartbeat (a second; its GPUs are measured by a child Python, a few seconds more)."""
    names = {worker_pair.roomy.name, worker_pair.narrow.name}
    wait_for(
        lambda: set(WorkerNode.objects.filter(hostname__in=names).values_list("hostname", flat=True)) == names,
        timeout=120,
        what="both workers to announce themselves",
    )
    return worker_pair


def _node(worker: LiveWorker) -> WorkerNode:
    return WorkerNode.objects.get(hostname=worker.name)


def _can_hold(worker_name: str, job: Job) -> bool:
    """Whether the worker, as it announced itself, can hold the job by the memory plan's rules."""
    resources = nodes.node_resources(WorkerNode.objects.get(hostname=worker_name), device_class=job.device_class)
    try:
        plan_memory(nodes.job_footprint(job), resources, device="cpu")
    except PreflightError:
        return False
    return True


def test_both_workers_announce_what_their_caps_leave_them(pair):
    roomy, narrow = _node(pair.roomy), _node(pair.narrow)

    # Each is online on its machine, with the cpu queue and a queue of its own
    for node, worker in ((roomy, pair.roomy), (narrow, pair.narrow)):
        assert node.is_online() and node.node == socket.gethostname()
        assert node.queues == sorted(["cpu", f"node.{worker.name}"]) and node.gpus == []
    # ...and the figures its caps left it (the rest as measured)
    assert (roomy.host_ram_bytes, roomy.disk_free_bytes) == (4000 * MB, 150 * MB)
    assert roomy.capped == ["host_ram", "disk"] and roomy.caps["disk_mb"] == 150
    assert narrow.host_ram_bytes == 900 * MB and narrow.disk_free_bytes > 150 * MB and narrow.capped == ["host_ram"]
    assert narrow.caps == {"host_ram_mb": 900, "gpu_memory_mb": None, "gpus": 0, "disk_mb": None, "data_parallel": None}


def test_each_job_lands_on_a_worker_that_can_hold_it(
    pair, api, admin_client, settings, tiny_model_dir, builtin_model, wait_for
):
    settings.COMPRESSOR_ALLOW_LOCAL_PATHS = True  # the tiny model comes from a server folder

    # Given the built-in model, which only the narrow worker can hold, and the tiny one, which both can
    big = api.post("/api/v1/jobs/", {**DATA_FREE, "model": "smollm2-135m-instruct"}, format="json")
    tiny = api.post("/api/v1/jobs/", {**DATA_FREE, "model": str(tiny_model_dir)}, format="json")
    assert big.status_code == 201 and tiny.status_code == 201, (big.content, tiny.content)

    # When both are submitted, the built-in one waits on a worker's own queue, the tiny one on the shared queue
    big_job, tiny_job = Job.objects.get(pk=big.json()["id"]), Job.objects.get(pk=tiny.json()["id"])
    assert big_job.queue.startswith("node.") and big_job.queue != nodes.own_queue(pair.roomy.name)
    assert tiny_job.queue == "cpu"

    # Then the built-in one starts on the worker whose queue it waited in, one that can hold it
    def started(job_id: int) -> Job | None:
        job = Job.objects.get(pk=job_id)
        assert job.status in (Job.Status.QUEUED, Job.Status.RUNNING, Job.Status.SUCCEEDED), job.error
        return job if job.worker else None

    big_job = wait_for(lambda: started(big_job.pk), timeout=300, what="the built-in model's job to start")
    assert big_job.queue == nodes.own_queue(big_job.worker) and _can_hold(big_job.worker, big_job)
    assert not _can_hold(pair.roomy.name, big_job)

    # ...the admin's queue page shows it as that node's current job
    html = admin_client.get("/admin/jobs/job/queue/workers/", HTTP_X_REQUESTED_WITH="fetch").text
    row = html[html.index(f"<td>{big_job.worker}</td>") :].split("</tr>")[0]
    assert f"Job {big_job.pk}" in row and "online" in row

    # ...and the tiny one runs to success on a worker that can hold it (the built-in one is cancelled: on a
    # CPU it would take minutes and proves nothing more)
    api.post(f"/api/v1/jobs/{big_job.pk}/cancel/")
    tiny_job = wait_for(
        lambda: Job.objects.filter(pk=tiny_job.pk, status__in=Job.TERMINAL).first(), timeout=600, what="the tiny job"
    )
    assert tiny_job.status == Job.Status.SUCCEEDED, tiny_job.error
    assert _can_hold(tiny_job.worker, tiny_job)


def test_a_job_no_worker_can_hold_is_refused_at_submission_with_the_figures(pair, api, hub, hub_repo_id):
    # Given a 405 B model on the hub (its header is real, its 812 GB of weights are never read)
    repo_id = hub_repo_id("llama-405b")
    config = Blob.of_bytes(json.dumps(LLAMA_405B_CONFIG).encode())
    hub.add_repo(
        repo_id, {"config.json": config, "model.safetensors": synthetic_safetensors(llama_shapes(LLAMA_405B_CONFIG))}
    )

    # When it is submitted for the cpu workers
    response = api.post("/api/v1/jobs/", {**DATA_FREE, "model": repo_id}, format="json")

    # Then it is refused at once, on the model field, with what it needs against the largest worker's figures
    assert response.status_code == 400, response.content
    message = " ".join(response.json()["model"])
    assert message.startswith("No cpu worker here can hold this job. The largest, ")
    assert " GB" in message.split("refuses it:")[1] and "host memory" in message and "disk" in message
    assert not Job.objects.exists()


def test_the_admin_lists_both_nodes_and_a_worker_that_stops_goes_offline(pair, admin_client, settings, wait_for):
    # Given both workers online, on the admin's queue page with what they announced
    html = admin_client.get("/admin/jobs/job/queue/workers/", HTTP_X_REQUESTED_WITH="fetch").text
    for worker, ram in ((pair.roomy, "4.00 GB (capped)"), (pair.narrow, "900.0 MB (capped)")):
        row = html[html.index(f"<td>{worker.name}</td>") :].split("</tr>")[0]
        assert "online" in row and ram in row and f"node.{worker.name}" in row
    assert "150.0 MB (capped)" in html

    # When the roomy one shuts down cleanly, it is offline at once
    stop_worker_process(pair.roomy.process)
    assert not _node(pair.roomy).is_online() and _node(pair.roomy).stopped_at is not None

    # ...and when the narrow one is killed, it is offline once its heartbeat is older than the timeout
    settings.COMPRESSOR_NODE_OFFLINE_AFTER_S = 5
    assert _node(pair.narrow).is_online()
    os.killpg(pair.narrow.process.pid, signal.SIGKILL)
    pair.narrow.process.wait()
    wait_for(lambda: not _node(pair.narrow).is_online(), timeout=30, what="the killed worker to go offline")
    assert _node(pair.narrow).stopped_at is None  # it never said goodbye
    html = admin_client.get("/admin/jobs/job/queue/workers/", HTTP_X_REQUESTED_WITH="fetch").text
    for worker in (pair.roomy, pair.narrow):
        assert "offline" in html[html.index(f"<td>{worker.name}</td>") :].split("</tr>")[0]
