"""make gpu-check (bench/part_gpu.py) on a machine without a GPU, as CI is: it refuses in one sentence with a
non-zero exit before doing anything, checks its arguments first, and plans its steps from the GPUs it finds.
The steps themselves need a GPU and run there (bench/results/gpu.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import part_gpu
from bench.common import Figure
from bench.random_model import SMALL_8_HEADS
from engine.plan import tensor_parallel_problem
from tests.support import REPO

SCRIPT = REPO / "bench" / "part_gpu.py"


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_refuses_without_a_gpu_in_one_sentence_and_writes_nothing(tmp_path):
    # Given this machine's torch, which sees no GPU, when the check runs with every step
    report = tmp_path / "gpu.md"
    done = gpu_check("--out", str(report))

    # Then it stops with a refusal's status and one sentence saying what it needs and what it found
    assert done.returncode == part_gpu.REFUSAL, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("make gpu-check needs an NVIDIA GPU that torch can use")
    assert "torch 2.13.0" in lines[0] and lines[0].endswith(".")
    assert not report.exists()


def test_the_probe_alone_refuses_the_same_way():
    done = gpu_check("--probe")

    assert done.returncode == part_gpu.REFUSAL
    assert done.stderr.strip().startswith("make gpu-check needs an NVIDIA GPU")


def test_an_unknown_preset_is_refused_by_name_before_the_gpu_is_looked_for():
    done = gpu_check("--presets", "fp8-static,int9-magic")

    assert done.returncode == 2
    assert "unknown preset(s) int9-magic" in done.stderr
    assert "int8-w8a8-gptq" in done.stderr  # the known ones are listed
    assert "NVIDIA GPU" not in done.stderr


def test_counts_below_one_are_refused():
    done = gpu_check("--prompts", "0")

    assert done.returncode == 2
    assert "--prompts must be 1 or more, not 0" in done.stderr


def test_by_default_the_three_seed_presets_and_every_step_with_vllm_eager():
    options, probe_only = part_gpu.options_from_args([])

    assert options.presets == ("fp8-static", "sparse24-fp8-dynamic", "int8-w8a8-gptq")
    assert options.skip == frozenset()
    assert not probe_only
    assert options.vllm_engine_args()["enforce_eager"] is True
    assert options.out == REPO / "bench" / "results" / "gpu.md"
    assert len(options.prompt_list()) == 32


def test_presets_steps_and_vllm_mode_from_the_command_line(tmp_path):
    options, _ = part_gpu.options_from_args(
        ["--presets", "int8-w8a8-gptq, fp8-static,int8-w8a8-gptq", "--skip", "job", "--skip", "tensor-parallel",
         "--compiled", "--prompts", "4", "--vllm-python", str(tmp_path / "python")]
    )  # fmt: skip

    assert options.presets == ("int8-w8a8-gptq", "fp8-static")  # in the order given, once each
    assert options.skip == {"job", "tensor-parallel"}
    assert "enforce_eager" not in options.vllm_engine_args()
    assert options.prompt_list() == [f"Write a short story about {topic}." for topic in part_gpu.TOPICS[:4]]
    assert options.vllm_python == tmp_path / "python"


def test_a_missing_vllm_environment_is_named_unless_vllm_is_skipped(tmp_path):
    missing = part_gpu.Options(vllm_python=tmp_path / "vllm-venv" / "bin" / "python")
    assert "make vllm-env" in part_gpu.vllm_problem(missing)

    without_vllm = part_gpu.Options(vllm_python=Path(sys.executable))  # this Python has no vLLM
    assert f"{sys.executable} cannot import vllm" in part_gpu.vllm_problem(without_vllm)

    skipped = part_gpu.Options(vllm_python=tmp_path / "none", skip=frozenset({"vllm"}))
    assert part_gpu.vllm_problem(skipped) is None


def test_the_tensor_parallel_load_needs_two_gpus_and_heads_that_split():
    # One GPU: not run, saying why
    model, why = part_gpu.tensor_parallel_plan(1, builtin_heads=9)
    assert model is None and why == "n/a: 1 GPU (a tensor-parallel load needs 2)"

    # Two GPUs, the built-in model's 9 heads: vLLM could not split them, so the 8-head random model
    assert tensor_parallel_problem(9, 2) is not None
    model, why = part_gpu.tensor_parallel_plan(2, builtin_heads=9)
    assert model == "small-8-heads" and "9 attention heads do not split over 2 GPUs" in why
    assert tensor_parallel_problem(SMALL_8_HEADS["num_attention_heads"], 2) is None
    assert SMALL_8_HEADS["num_key_value_heads"] % 2 == 0

    # Heads that split: the built-in model itself
    assert part_gpu.tensor_parallel_plan(4, builtin_heads=8)[0] == "builtin"


def test_the_report_has_the_gpu_every_row_and_the_wall_time_against_the_budget(tmp_path):
    probe = part_gpu.GpuProbe(torch="2.13.0+cu130", cuda="13.0", gpus=("NVIDIA H100 80GB HBM3",), nvidia_smi=())
    figures = [
        Figure("gpu", "int8-w8a8-gptq on the built-in model by the engine", "runs on cuda", "cuda (H100): 21 s",
               verdict="met", details=["step 'compress' took 60 s"]),
        Figure("gpu", "vLLM (GPU build): tensor-parallel load over 2 GPUs", "vLLM runs 2 ranks",
               "n/a: 1 GPU (a tensor-parallel load needs 2)", verdict="n/a"),
    ]  # fmt: skip

    text = part_gpu.write_report(tmp_path / "gpu.md", figures, probe, elapsed_s=301).read_text()

    assert "- **GPU**: 1 x NVIDIA H100 80GB HBM3 (torch 2.13.0+cu130, CUDA 13.0)" in text
    assert "| int8-w8a8-gptq on the built-in model by the engine | runs on cuda | cuda (H100): 21 s | - | met |" in text
    assert "| n/a: 1 GPU (a tensor-parallel load needs 2) | - | n/a |" in text
    assert "- **wall time**: 301 s (within the 8-minute budget)" in text
    assert "- step 'compress' took 60 s" in text


def test_the_bench_part_reads_not_applicable_without_a_gpu():
    (figure,) = part_gpu.run()

    assert figure.verdict == "n/a"
    assert figure.measured.startswith("n/a: make gpu-check needs an NVIDIA GPU")


def test_vllm_gets_the_prompts_in_the_models_chat_template(builtin_model, tmp_path):
    # An instruct model given bare text may answer with its end token at once: nothing to time
    (prompt,) = part_gpu.chat_prompts(builtin_model, ["Write a short story about rain."])
    assert prompt.endswith("<|im_start|>user\nWrite a short story about rain.<|im_end|>\n<|im_start|>assistant\n")

    # A model without a chat template gets the text as it is
    assert part_gpu.chat_prompts(tmp_path, ["plain"]) == ["plain"]
