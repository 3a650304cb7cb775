"""The routing choice (jobs.nodes): which queue a job goes to among the registered workers, sized by the memory
plan's own rules from the shape recorded at submission; and what the submission and a re-queue do with it."""

from __future__ import annotations

import pytest
from django.utils import timezone

from engine.errors import PreflightError
from engine.plan import header_shape, shape_footprint
from engine.resources import MB, Gpu, WorkerCaps, WorkerResources
from jobs import nodes
from jobs.inputs import JobInput
from jobs.models import Job, WorkerNode
from jobs.nodes import Candidate, choose_queue
from jobs.services import lifecycle, recovery, storage, submissions
from tests.hub_server import LLAMA_3_2_1B_CONFIG, llama_shapes

CPU = Job.DeviceClass.CPU
GPU = Job.DeviceClass.GPU
A100 = Gpu(index=0, name="NVIDIA A100-SXM4-40GB", free_bytes=40_000 * MB)


def _footprint_1b(**calibration):
    tensors = {name: ("BF16", tuple(shape)) for name, shape in llama_shapes(LLAMA_3_2_1B_CONFIG).items()}
    shape = header_shape(LLAMA_3_2_1B_CONFIG, tensors)
    return shape_footprint(shape, **{"hessians": False, "samples": 0, "max_seq_len": 256, **calibration})


def _worker(name: str, ram_mb: int, *, online: bool = True, active: int = 0, gpus=(), disk_mb: int = 50_000):
    resources = WorkerResources(host_ram_bytes=ram_mb * MB, disk_free_bytes=disk_mb * MB, gpus=tuple(gpus))
    return Candidate(hostname=name, resources=resources, online=online, active_jobs=active)


# The 1 B model, data-free: 3.59 GB of host memory to hold it whole, 986.6 MB at least with disk offload.
ONE_B = _footprint_1b()


def test_without_any_registered_worker_the_job_waits_on_the_shared_queue():
    assert choose_queue(device_class=CPU, footprint=ONE_B, candidates=[]).queue == "cpu"


def test_a_job_every_online_worker_can_hold_goes_to_the_shared_queue():
    workers = [_worker("a@x", 8_000), _worker("b@y", 4_000), _worker("tiny@z", 500, online=False)]
    assert choose_queue(device_class=CPU, footprint=ONE_B, candidates=workers).queue == "cpu"


def test_a_job_only_some_workers_can_hold_goes_to_the_least_busy_of_those():
    # Given two workers that can hold the 1 B model (one busy) and one that cannot
    workers = [_worker("big@x", 8_000, active=2), _worker("mid@y", 4_000, active=0), _worker("small@z", 500)]

    # When it is routed
    route = choose_queue(device_class=CPU, footprint=ONE_B, candidates=workers)

    # Then it goes to the idle one that can hold it, on that worker's own queue, and says why
    assert route.queue == "node.mid@y"
    assert "small@z cannot hold this job" in route.why


def test_a_worker_that_can_hold_it_only_with_disk_offload_still_holds_it():
    workers = [_worker("offload@x", 1_000), _worker("small@y", 900)]
    assert choose_queue(device_class=CPU, footprint=ONE_B, candidates=workers).queue == "node.offload@x"


def test_an_offline_worker_that_can_hold_it_is_waited_for_when_no_online_one_can():
    workers = [_worker("big@x", 8_000, online=False), _worker("small@y", 500)]
    route = choose_queue(device_class=CPU, footprint=ONE_B, candidates=workers)
    assert route.queue == "node.big@x" and "offline now" in route.why


def test_while_no_worker_is_online_a_job_all_of_them_can_hold_waits_on_the_shared_queue():
    workers = [_worker("a@x", 8_000, online=False), _worker("b@y", 4_000, online=False)]
    assert choose_queue(device_class=CPU, footprint=ONE_B, candidates=workers).queue == "cpu"


def test_a_job_no_registered_worker_can_hold_is_refused_with_the_largest_workers_figures():
    workers = [_worker("mid@x", 900), _worker("small@y", 500)]
    with pytest.raises(PreflightError) as refused:
        choose_queue(device_class=CPU, footprint=ONE_B, candidates=workers)
    assert refused.value.field == "model"
    message = refused.value.message
    assert message.startswith("No cpu worker here can hold this job. The largest, mid@x (900.0 MB host memory")
    assert "3.59 GB needed to hold the whole model, at least 986.6 MB with disk offload; 900.0 MB available" in message


def test_calibration_activations_can_be_what_no_worker_holds():
    # 512 samples of 4096 tokens: about 18 GB of activations between two layers, in host memory
    gptq = _footprint_1b(hessians=True, samples=512, max_seq_len=4096)
    with pytest.raises(PreflightError) as refused:
        choose_queue(device_class=CPU, footprint=gptq, candidates=[_worker("big@x", 6_000)])
    assert refused.value.field == "calibration" and "fewer samples" in refused.value.message


def test_a_gpu_job_is_sized_against_the_gpu_and_a_requested_gpu_count():
    # Given a GPU worker with one 40 GB GPU and little host memory, and a CPU-only one with more
    workers = [_worker("gpu0@x", 2_000, gpus=[A100]), _worker("cpu@y", 8_000)]

    # Then the 1 B model fits whole on the GPU there, and a job asking for two GPUs fits nowhere
    assert choose_queue(device_class=GPU, footprint=ONE_B, candidates=workers[:1]).queue == "gpu"
    with pytest.raises(PreflightError) as refused:
        choose_queue(device_class=GPU, footprint=ONE_B, candidates=workers[:1], gpus=2)
    assert refused.value.field == "gpus" and "asks for 2 GPUs; this worker has 1" in refused.value.message


def test_a_job_goes_back_to_the_online_worker_that_holds_its_compressed_layers():
    workers = [_worker("a@x", 8_000, active=1), _worker("b@y", 4_000), _worker("small@z", 500)]

    # Its own queue, even when every worker could hold the job (the shared queue otherwise), and it says why
    route = choose_queue(device_class=CPU, footprint=ONE_B, candidates=workers[:2], back_to="a@x")
    assert route.queue == "node.a@x" and route.why == "Sent back to a@x, which holds its compressed layers."
    assert choose_queue(device_class=CPU, footprint=ONE_B, candidates=workers[:2]).queue == "cpu"
    # ...but not to a worker that cannot hold it any more, nor to one that is offline: routed as any job then
    assert choose_queue(device_class=CPU, footprint=ONE_B, candidates=workers, back_to="small@z").queue == "node.b@y"
    offline = [_worker("a@x", 8_000, online=False), _worker("b@y", 4_000)]
    assert choose_queue(device_class=CPU, footprint=ONE_B, candidates=offline, back_to="a@x").queue == "cpu"


def test_a_model_without_a_header_is_not_sized_here():
    workers = [_worker("small@y", 500)]
    assert choose_queue(device_class=CPU, footprint=None, candidates=workers).queue == "cpu"


# --- with the registry's rows: the submission and a re-queue ------------------------------------------------


def _announce(hostname: str, ram_mb: int, queues=("cpu",)) -> WorkerNode:
    resources = WorkerResources(host_ram_bytes=ram_mb * MB, disk_free_bytes=50_000 * MB, capped=("host_ram",))
    return nodes.node_announce(
        hostname=hostname, queues=[*queues, nodes.own_queue(hostname)], resources=resources, caps=WorkerCaps(ram_mb)
    )


@pytest.mark.django_db
def test_submission_records_the_shape_and_routes_to_a_worker_that_can_hold_it(user, builtin_model):
    # Given a registered CPU worker too small for the built-in model (836 MB to hold it) and one big enough
    _announce("small@x", 500)
    _announce("big@y", 900)

    # When a data-free job on the built-in model is submitted for the CPU
    data = JobInput(preset="fp8-dynamic", calibration_kind="none", device_class=CPU)
    job = submissions.job_submit(owner=user, data=data).job

    # Then it waits on the big worker's own queue, with the shape it was sized by on the record and the reason
    assert job.queue == "node.big@y"
    assert job.model_facts["shape"]["num_layers"] == 30 and job.model_facts["num_parameters"] == 134_515_008
    log = [line.text for line in job.log_lines.all()]
    assert "Queued on 'node.big@y' with priority 5." in log and any("small@x cannot hold" in t for t in log)


@pytest.mark.django_db
def test_submission_is_refused_when_no_registered_worker_can_hold_it(user, builtin_model):
    _announce("small@x", 500)
    data = JobInput(preset="fp8-dynamic", calibration_kind="none", device_class=CPU)
    with pytest.raises(PreflightError) as refused:
        submissions.job_submit(owner=user, data=data)
    assert (
        "836.3 MB needed to hold the whole model" in refused.value.message
        and "500.0 MB available" in refused.value.message
    )
    assert not Job.objects.exists()


@pytest.mark.django_db
def test_a_floor_search_is_sized_with_the_trials_copy_of_the_weights(user, builtin_model):
    # Given a worker that holds the built-in model once (836 MB) but not the search's two copies of its weights
    _announce("mid@x", 900)
    search = {"floor": {"at_least": 0.99}}
    data = JobInput(preset="fp8-dynamic", calibration_kind="none", device_class=CPU, search=search)

    # Then a floor search is refused with the figures, while the same job without the search is queued
    with pytest.raises(PreflightError) as refused:
        submissions.job_submit(owner=user, data=data)
    assert "only fits with disk offload" in refused.value.message and refused.value.field == "search"
    plain = JobInput(preset="fp8-dynamic", calibration_kind="none", device_class=CPU)
    assert submissions.job_submit(owner=user, data=plain).job.queue == "cpu" and Job.objects.count() == 1


@pytest.mark.django_db
def test_the_least_busy_worker_is_counted_from_its_running_and_waiting_jobs(user, builtin_model):
    # Given one worker too small for the built-in model and two big ones: a@x runs two jobs, b@y has one waiting
    # in its own queue (and a third big worker's running job counts for that worker only)
    _announce("small@x", 500)
    _announce("a@x", 900)
    _announce("b@y", 900)
    _announce("c@z", 900, queues=("gpu",))
    data = JobInput(preset="fp8-dynamic", calibration_kind="none", device_class=CPU)
    for worker in ("a@x", "a@x", "c@z"):
        running = submissions.job_submit(owner=user, data=data, force=True).job
        assert lifecycle.job_start(job_id=running.pk, task_id=running.celery_task_id, worker=worker) is not None
    waiting = submissions.job_submit(owner=user, data=data, force=True).job
    Job.objects.filter(pk=waiting.pk).update(queue="node.b@y")

    # Then the next job goes to b@y (1 against 2), the next to a@x (2 and 2: by name), the next to b@y (3 to 2)
    queues = [submissions.job_submit(owner=user, data=data, force=True).job.queue for _ in range(3)]
    assert queues == ["node.b@y", "node.a@x", "node.b@y"]

    # And a job sent again is not counted behind itself: with a@x running one job and b@y holding only the job
    # being routed, b@y is the least busy (0 against 1; counted with itself, 1 and 1 would go to a@x by name)
    waiting_jobs = Job.objects.filter(status=Job.Status.QUEUED, queue__in=["node.a@x", "node.b@y"])
    waiting_jobs.exclude(pk=waiting.pk).update(status=Job.Status.CANCELLED)
    Job.objects.filter(pk=Job.objects.filter(worker="a@x", status=Job.Status.RUNNING).first().pk).update(
        status=Job.Status.SUCCEEDED
    )
    waiting.refresh_from_db()
    assert nodes.job_route(waiting).queue == "node.b@y"


@pytest.mark.django_db
def test_workers_of_another_device_class_do_not_count(user, builtin_model):
    _announce("small-gpu@x", 500, queues=("gpu",))
    data = JobInput(preset="fp8-dynamic", calibration_kind="none", device_class=CPU)
    assert submissions.job_submit(owner=user, data=data).job.queue == "cpu"


@pytest.mark.django_db
def test_a_job_whose_node_went_away_is_requeued_on_one_that_can_hold_it(user, builtin_model):
    # Given a job running on big@y's own queue
    _announce("small@x", 500)
    _announce("big@y", 900)
    job = submissions.job_submit(
        owner=user, data=JobInput(preset="fp8-dynamic", calibration_kind="none", device_class=CPU)
    ).job
    assert lifecycle.job_start(job_id=job.pk, task_id=job.celery_task_id, worker="big@y") is not None

    # When big@y shuts down, another big worker is there, and the run is lost
    nodes.node_offline(hostname="big@y")
    _announce("big2@z", 1_000)
    action = recovery.job_worker_lost(job_id=job.pk, task_id=job.celery_task_id, reason="shut down")

    # Then the job waits on the other big worker's queue
    job.refresh_from_db()
    assert action == "requeued" and job.status == Job.Status.QUEUED and job.queue == "node.big2@z"


@pytest.mark.django_db
@pytest.mark.parametrize("stored_layers", [True, False])
def test_a_job_whose_run_died_goes_back_to_its_worker_when_that_holds_its_layers(
    user, builtin_model, settings, tmp_path, stored_layers
):
    # Given a job that every worker can hold, running on a@x, whose run stored compressed layers on a@x's disk
    settings.MEDIA_ROOT = tmp_path
    _announce("a@x", 900)
    _announce("b@y", 900)
    data = JobInput(preset="int8-w8a8-gptq", device_class=CPU)
    job = submissions.job_submit(owner=user, data=data).job
    assert job.queue == "cpu"
    assert lifecycle.job_start(job_id=job.pk, task_id=job.celery_task_id, worker="a@x") is not None
    if stored_layers:
        storage.job_resume_folder(job).mkdir(parents=True)

    # When its run dies and a@x, still online, re-queues it
    action = recovery.job_worker_lost(job_id=job.pk, task_id=job.celery_task_id, reason="was killed (signal 9)")

    # Then attempt 2 waits on a@x's own queue, where it resumes; without stored layers, on the shared queue
    job.refresh_from_db()
    assert action == "requeued" and job.status == Job.Status.QUEUED
    log = [line.text for line in job.log_lines.all()]
    if stored_layers:
        assert job.queue == "node.a@x" and "Sent back to a@x, which holds its compressed layers." in log
    else:
        assert job.queue == "cpu" and not any("Sent back" in line for line in log)


@pytest.mark.django_db
def test_a_worker_is_online_while_it_beats_and_offline_after_a_clean_shutdown_or_silence(settings):
    settings.COMPRESSOR_NODE_OFFLINE_AFTER_S = 60
    node = _announce("w@x", 900)
    assert node.is_online() and node.own_queue == "node.w@x"
    assert not node.is_online(now=timezone.now() + timezone.timedelta(seconds=61))
    nodes.node_offline(hostname="w@x")
    node.refresh_from_db()
    assert not node.is_online()
    assert nodes.node_beat(hostname="w@x") and WorkerNode.objects.get(hostname="w@x").is_online()
    assert not nodes.node_beat(hostname="gone@x")


@pytest.mark.django_db
def test_jobs_waiting_for_a_worker_that_went_offline_are_routed_again(user, builtin_model):
    # Given a job waiting in big@y's own queue (small@x cannot hold it)
    _announce("small@x", 500)
    _announce("big@y", 900)
    data = JobInput(preset="fp8-dynamic", calibration_kind="none", device_class=CPU)
    job = submissions.job_submit(owner=user, data=data).job
    assert job.queue == "node.big@y"

    # When big@y shuts down: nothing moves while no other worker can hold the job
    nodes.node_offline(hostname="big@y")
    assert recovery.job_reroute_from_offline_nodes() == []

    # ...and once another worker that can hold it is online, the job moves there with a new message
    _announce("big2@z", 1_000)
    old_task_id = job.celery_task_id
    assert recovery.job_reroute_from_offline_nodes() == [job.pk]
    job.refresh_from_db()
    assert job.queue == "node.big2@z" and job.celery_task_id != old_task_id and job.status == Job.Status.QUEUED
    assert any("The worker of 'node.big@y' is offline" in line.text for line in job.log_lines.all())
