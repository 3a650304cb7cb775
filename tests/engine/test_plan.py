"""The memory plan on real architectures' shapes (Llama 3.1 8B and 405B, skeletons on the meta device)
against the workers people run them on; and the worker's resources as measured and capped."""

import pytest

from engine.errors import PreflightError
from engine.plan import (
    DISK_OFFLOAD,
    GPU,
    SEQUENTIAL,
    ModelShape,
    header_shape,
    model_footprint,
    plan_memory,
    search_plan,
    shape_footprint,
    skeleton_shape,
)
from engine.resources import MB, Gpu, WorkerCaps, WorkerResources, detect_resources

GB = 10**9
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32}
LLAMA_405B = {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128}
H100 = Gpu(index=0, name="NVIDIA H100 80GB HBM3", free_bytes=79 * GB)
T4 = Gpu(index=0, name="Tesla T4", free_bytes=15 * GB)
RTX_4090 = Gpu(index=0, name="NVIDIA GeForce RTX 4090", free_bytes=23 * GB)


def _skeleton(shape: dict):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def llama_8b():
    return _skeleton(LLAMA_8B)


@pytest.fixture(scope="module")
def llama_405b():
    return _skeleton(LLAMA_405B)


def gptq(skeleton, samples: int = 512, max_seq_len: int = 2048):
    """GPTQ with the seed cards' calibration: 512 samples of 2048 tokens."""
    return model_footprint(skeleton, hessians=True, samples=samples, max_seq_len=max_seq_len)


def data_free(skeleton):
    return model_footprint(skeleton, hessians=False, samples=0, max_seq_len=2048)


def worker(host_gb: float, disk_gb: float = 4000, gpus=()) -> WorkerResources:
    return WorkerResources(host_ram_bytes=int(host_gb * GB), disk_free_bytes=int(disk_gb * GB), gpus=tuple(gpus))


def test_the_footprint_counts_the_real_models_parameters(llama_8b, llama_405b):
    assert round(gptq(llama_8b).num_parameters / GB, 2) == 8.03
    assert round(gptq(llama_405b).num_parameters / GB, 1) == 405.9
    # bf16 weights; GPTQ's Hessians of one layer outweigh the layer itself
    big = gptq(llama_405b)
    assert round(big.weights_bytes / GB) == 812 and big.layer_work_bytes > 3 * big.layer_bytes
    assert data_free(llama_405b).layer_work_bytes == 0 and data_free(llama_405b).calibration_cache_bytes == 0


def test_an_8b_model_runs_whole_on_an_80_gb_gpu(llama_8b):
    plan = plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=[H100]))
    assert plan.mode == GPU and plan.device == "cuda:0"
    assert 16 * GB < plan.gpu.needed < 25 * GB and plan.gpu.available == 79 * GB
    assert "the whole model on the GPU" in plan.summary


def test_an_8b_model_goes_one_layer_at_a_time_through_a_16_gb_gpu(llama_8b):
    plan = plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=[T4]))
    assert plan.mode == SEQUENTIAL and plan.device == "cuda:0"
    assert plan.gpu.needed < 5 * GB  # one layer, its Hessians and one sample's activations
    assert 16 * GB < plan.host.needed < 40 * GB  # the whole model and the calibration activations
    assert "one decoder layer at a time to the GPU" in plan.summary


def test_the_gpu_with_most_free_memory_is_chosen(llama_8b):
    busy = Gpu(index=0, name="NVIDIA H100 80GB HBM3", free_bytes=10 * GB)
    idle = Gpu(index=1, name="NVIDIA H100 80GB HBM3", free_bytes=79 * GB)
    plan = plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=[busy, idle]))
    assert plan.mode == GPU and plan.device == "cuda:1"


def test_on_a_cpu_only_worker_the_sequential_plan_is_the_plain_cpu_run(llama_8b):
    plan = plan_memory(data_free(llama_8b), worker(host_gb=32))
    assert plan.mode == SEQUENTIAL and plan.device == "cpu" and plan.gpu is None
    assert plan.summary.startswith("the whole model in host memory")
    # GPTQ computes its Hessians on the CPU there: they count in host memory
    assert plan_memory(gptq(llama_8b), worker(host_gb=64)).host.needed > plan.host.needed + 18 * GB


def test_405b_on_one_gpu_with_enough_host_memory_is_sequential(llama_405b):
    plan = plan_memory(gptq(llama_405b), worker(host_gb=2000, gpus=[H100]))
    assert plan.mode == SEQUENTIAL and plan.gpu.needed < 40 * GB and plan.host.needed > 850 * GB


def test_405b_with_short_host_memory_offloads_what_does_not_fit_to_disk(llama_405b):
    plan = plan_memory(gptq(llama_405b), worker(host_gb=256, disk_gb=4000, gpus=[H100]))
    assert plan.mode == DISK_OFFLOAD and plan.device == "cuda:0"
    assert 100 * GB < plan.host_weights_bytes < 256 * GB and plan.offloaded_bytes > 500 * GB
    assert plan.host_weights_bytes + plan.offloaded_bytes == gptq(llama_405b).weights_bytes
    # the disk holds the checkpoint and the offloaded weights; a checkpoint shard stays small in memory
    assert plan.disk.needed > 811 * GB + plan.offloaded_bytes and plan.shard_bytes <= 5 * GB
    assert plan.host.needed <= plan.host.available == 256 * GB
    assert "disk offload" in plan.summary and "on the GPU" in plan.summary


def test_disk_offload_without_the_disk_for_it_is_refused_with_the_figures(llama_405b):
    with pytest.raises(PreflightError) as refused:
        plan_memory(gptq(llama_405b), worker(host_gb=256, disk_gb=1000, gpus=[H100]))
    message = refused.value.message
    assert message.startswith("Not enough free disk space") and "1000.00 GB are free" in message
    assert "offloaded to disk" in message


def test_too_little_host_memory_is_refused_with_the_figures_and_the_field_to_change(llama_405b):
    # Given GPTQ's calibration activations alone do not fit in 64 GB: the calibration is to blame
    with pytest.raises(PreflightError) as refused:
        plan_memory(gptq(llama_405b), worker(host_gb=64, gpus=[H100]))
    assert refused.value.field == "calibration"
    message = refused.value.message
    assert "405.85 B parameters (811.71 GB in bfloat16)" in message and "64.00 GB available" in message
    assert "with disk offload" in message and "GPU: " in message and "fewer samples" in message

    # Given a data-free recipe on a 16 GB worker: the model itself is too big
    with pytest.raises(PreflightError) as refused:
        plan_memory(data_free(llama_405b), worker(host_gb=16))
    assert refused.value.field == "model" and "16.00 GB available" in refused.value.message


def test_a_gpu_too_small_for_one_layer_is_refused(llama_405b):
    with pytest.raises(PreflightError) as refused:
        plan_memory(gptq(llama_405b), worker(host_gb=2000, gpus=[RTX_4090]))
    assert refused.value.field == "device"
    assert "One decoder layer and its Hessians" in refused.value.message
    assert "NVIDIA GeForce RTX 4090) has 23.00 GB free" in refused.value.message


def test_a_gpu_asked_for_on_a_worker_without_one_is_refused(llama_8b):
    with pytest.raises(PreflightError, match="A GPU was requested") as refused:
        plan_memory(data_free(llama_8b), worker(host_gb=64), device="cuda")
    assert refused.value.field == "device"


def test_caps_lower_what_the_worker_measures_and_say_so(tmp_path):
    measured = detect_resources(tmp_path)
    capped = detect_resources(tmp_path / "not-yet", caps=WorkerCaps(host_ram_mb=100, disk_mb=50, gpus=0))
    assert capped.host_ram_bytes == 100 * MB and capped.disk_free_bytes == 50 * MB and capped.gpus == ()
    assert set(capped.capped) == {"host_ram", "disk"}
    # a cap above what is there changes nothing; a CPU job never counts the GPUs
    generous = detect_resources(tmp_path, caps=WorkerCaps(host_ram_mb=10**9), device="cpu")
    assert generous.capped == () and generous.gpus == ()
    assert abs(generous.host_ram_bytes - measured.host_ram_bytes) < 2 * GB


def test_the_plan_records_its_figures_for_the_page_and_the_card(llama_8b):
    resources = WorkerResources(host_ram_bytes=64 * GB, disk_free_bytes=500 * GB, gpus=(T4,), capped=("gpu_memory",))
    recorded = plan_memory(gptq(llama_8b), resources).to_dict()
    assert recorded["mode"] == SEQUENTIAL and recorded["device"] == "cuda:0"
    assert set(recorded["figures"]) == {"host_ram", "gpu", "disk"}
    assert recorded["figures"]["gpu"]["name"] == "Tesla T4" and recorded["figures"]["gpu"]["capped"] is True
    assert recorded["figures"]["host_ram"] == {"needed": recorded["figures"]["host_ram"]["needed"],
                                               "available": 64 * GB, "capped": False}  # fmt: skip


# --- a job's GPUs ----------------------------------------------------------------------------------


def h100s(count: int, free_gb: float = 79) -> list[Gpu]:
    return [Gpu(index=i, name="NVIDIA H100 80GB HBM3", free_bytes=int(free_gb * GB)) for i in range(count)]


def test_405b_on_eight_gpus_uses_all_of_them_for_tensor_parallel_evaluation(llama_405b):
    # Seed 002's node: 8 x 80 GB hold no whole 405B model, so the plan takes every GPU tensor parallelism can use
    plan = plan_memory(gptq(llama_405b), worker(host_gb=2000, gpus=h100s(8)))
    assert plan.mode == SEQUENTIAL and plan.device == "cuda:0"
    assert plan.tensor_parallel_size == 8 and [gpu.index for gpu in plan.gpus] == list(range(8))
    assert "over 8 GPUs" in plan.summary and "tensor parallel 8" in plan.summary
    assert plan.to_dict()["tensor_parallel_size"] == 8 and len(plan.to_dict()["gpus"]) == 8
    # evaluation spreads the model over the eight (the computing GPU first), each less the CUDA context
    placement = plan.placement()
    assert [index for index, _free in placement.gpus] == list(range(8))
    assert all(78 * GB <= free < 79 * GB for _index, free in placement.gpus)


def test_as_many_as_the_plan_needs_is_the_fewest_gpus_that_hold_the_whole_model(llama_8b):
    # 16 GB of bf16 weights: more than one 15 GB T4 holds, half of it fits on each of two
    t4s = [Gpu(index=i, name="Tesla T4", free_bytes=15 * GB) for i in range(4)]
    plan = plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=t4s))
    assert plan.tensor_parallel_size == 2 and plan.mode == SEQUENTIAL  # compressing: one layer at a time on one
    assert "evaluation and the vLLM check over 2 GPUs (cuda:0, cuda:1, tensor parallel 2)" in plan.summary
    # a model that fits on one GPU keeps to one: nothing to split
    assert plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=h100s(4))).tensor_parallel_size == 1


def test_a_job_gets_the_number_of_gpus_it_asks_for_the_least_busy_first(llama_8b):
    gpus = [Gpu(index=0, name="H100", free_bytes=20 * GB), *h100s(4)[1:]]
    plan = plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=gpus), gpus=2)
    assert [gpu.index for gpu in plan.gpus] == [1, 2] and plan.device == "cuda:1"


def test_more_gpus_than_the_worker_has_are_refused_with_both_counts(llama_8b):
    with pytest.raises(PreflightError) as refused:
        plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=h100s(4)), gpus=8)
    assert refused.value.field == "gpus"
    assert "asks for 8 GPUs; this worker has 4" in refused.value.message
    with pytest.raises(PreflightError, match="asks for 1 GPU; this worker has none"):
        plan_memory(gptq(llama_8b), worker(host_gb=64), gpus=1)


def test_a_gpu_count_that_does_not_divide_the_attention_heads_is_refused(llama_8b):
    with pytest.raises(PreflightError) as refused:
        plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=h100s(4)), gpus=3)
    assert refused.value.field == "gpus"
    assert "32 attention heads" in refused.value.message and "Ask for 1, 2, 4, 8 GPU(s)" in refused.value.message


def test_the_vllm_child_sees_the_jobs_gpus_as_the_machine_numbers_them():
    from engine.isolated import visible_devices

    # a worker that owns the machine's GPUs 4-7 sees them as 0-3
    assert visible_devices([1, 2], "4,5,6,7") == "5,6"
    assert visible_devices([0, 1], None) == "0,1"


def test_the_header_gives_the_skeletons_shape_so_submission_sizes_a_job_as_the_worker_does(llama_8b):
    # Given Llama 3.1 8B as its safetensors header names its tensors, and as a skeleton on the meta device
    tensors = {name: ("BF16", tuple(p.shape)) for name, p in llama_8b.named_parameters()}
    config = {**LLAMA_8B, "num_key_value_heads": 8, "vocab_size": 128256, "head_dim": 128}

    # Then both give the same shape, and the same footprint for a GPTQ job
    shape = header_shape(config, tensors)
    assert shape == skeleton_shape(llama_8b) and ModelShape.from_dict(shape.to_dict()) == shape
    assert shape_footprint(shape, hessians=True, samples=512, max_seq_len=2048) == gptq(llama_8b)
    # ...and a model without a header (pickle weights only) is not sized at submission
    assert header_shape(config, {}) is None


def test_the_gpus_can_be_measured_by_a_child_python(tmp_path):
    # The worker's main process announces itself this way (CUDA must not start there before the pool forks)
    in_child = detect_resources(tmp_path, gpus_in_child=True)
    here = detect_resources(tmp_path)
    assert [(g.index, g.name) for g in in_child.gpus] == [(g.index, g.name) for g in here.gpus]


# --- data-parallel calibration -----------------------------------------------------------------------


def test_gptq_on_a_job_with_several_gpus_calibrates_with_one_rank_per_gpu(llama_405b, llama_8b):
    plan = plan_memory(gptq(llama_405b), worker(host_gb=2000, gpus=h100s(8)))
    assert plan.data_parallel == 8 and plan.to_dict()["data_parallel"] == 8
    assert "calibration data-parallel over 8 ranks (one rank per GPU)" in plan.summary
    # a data-free recipe has nothing to calibrate; a job on one GPU has nothing to share
    assert plan_memory(data_free(llama_405b), worker(host_gb=2000, gpus=h100s(8))).data_parallel == 1
    assert plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=h100s(4))).data_parallel == 1
    assert plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=h100s(4)), gpus=4).data_parallel == 4


def test_the_operator_chooses_the_ranks_and_cpu_ranks_each_need_their_copy(llama_8b):
    assert plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=h100s(4)), gpus=4, data_parallel=1).data_parallel == 1
    assert plan_memory(gptq(llama_8b), worker(host_gb=64, gpus=h100s(2)), gpus=2, data_parallel=8).data_parallel == 2
    one = plan_memory(gptq(llama_8b), worker(host_gb=128))
    two = plan_memory(gptq(llama_8b), worker(host_gb=128), data_parallel=2)
    assert two.data_parallel == 2 and "gloo between CPU processes" in two.summary
    assert two.host.needed > one.host.needed + 16 * GB  # a second copy of the 16 GB of weights
    # without the memory for a second copy, one process calibrates
    assert plan_memory(gptq(llama_8b), worker(host_gb=40), data_parallel=2).data_parallel == 1


def test_a_search_holds_the_weights_twice_so_a_worker_that_holds_them_once_refuses_it(llama_8b):
    # Given an 8B model (16 GB of bf16 weights): one run fits whole in 24 GB of host memory
    assert plan_memory(data_free(llama_8b), worker(host_gb=24)).mode == SEQUENTIAL

    # Then a search (the original and a trial's copy) only fits there with disk offload, which it refuses
    with pytest.raises(PreflightError) as refused:
        search_plan(data_free(llama_8b), worker(host_gb=24))
    assert "only fits with disk offload" in refused.value.message and refused.value.field == "search"
    # ...and with 48 GB it holds both copies, its disk need covering two checkpoints
    one_run, search = plan_memory(data_free(llama_8b), worker(host_gb=48)), search_plan(data_free(llama_8b), worker(48))
    assert search.mode == SEQUENTIAL and search.host.needed > one_run.host.needed + 16 * GB
    assert search.disk.needed > 1.9 * one_run.disk.needed
