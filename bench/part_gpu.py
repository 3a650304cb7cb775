"""Part 6, GPU, and `make gpu-check`: the seed presets on CUDA, vLLM's GPU build on their checkpoints, a
tensor-parallel load and a job through a real GPU worker; the figures go to bench/results/gpu.md.

    make gpu-check                                 # the vLLM environment first (make vllm-env), then this
    .venv/bin/python bench/part_gpu.py --probe     # only: has this machine a GPU that torch can use?
    .venv/bin/python bench/part_gpu.py --vllm-python var/vllm-venv/bin/python [--skip job] [--compiled]

The steps, each a row of gpu.md with its wall time (budget: 8 minutes on one H100; as of 2026-12-07 it has not
run on a GPU yet, so bench/results/gpu.md comes with its first run):
1. compress: each seed preset (fp8-static, sparse24-fp8-dynamic, int8-w8a8-gptq) on the built-in model by the
   engine's command line, which plans it on the GPU (device auto); its results.json must say cuda.
2. vllm: vLLM's GPU build (the vLLM environment) loads the bf16 model and each checkpoint through
   engine/vllm_child.py, as the "Checking in vLLM" stage does, and generates the same prompts: tokens/s
   against bf16. Eager by default (enforce_eager: no torch.compile and CUDA-graph capture, ~40 s a load);
   --compiled measures with vLLM's defaults.
3. tensor-parallel: with 2 GPUs or more, a load over 2 GPUs. The built-in model's 9 attention heads do not
   split over 2 (engine.plan.tensor_parallel_problem), so a random-weight model of 8 heads
   (bench/random_model.py --shape small-8-heads), compressed with int8-w8a8-gptq on the GPU first.
4. job: a job (int8-w8a8-gptq, device class gpu) through a real Celery worker on the gpu queue with the vLLM
   environment (COMPRESSOR_VLLM_PYTHON): submitted by jobs.services, its checkpoint checked in vLLM on the GPU.
   Its own SQLite database and data folder (var/gpu-check), Redis under the bench's key prefix.

Where torch sees no GPU it refuses at once with one sentence and exit status 2; a step that fails makes the
exit status 1 (gpu.md is written either way). In `make bench` (bench/run.py --part gpu) the same steps run
where there is a GPU; elsewhere the rows read n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    KEY_PREFIX,
    MODEL_STORE,
    PYTHON,
    REPO,
    RESULTS_DIR,
    Figure,
    machine_info,
    table,
    verdict,
)
from engine.errors import EngineError  # noqa: E402
from engine.isolated import VLLM_PYTHON_ENV, run_child, vllm_installed  # noqa: E402
from engine.plan import tensor_parallel_problem  # noqa: E402
from engine.presets import PRESETS  # noqa: E402
from engine.spec import BUILTIN_MODEL  # noqa: E402
from tests.support import wait_until  # noqa: E402

SEED_PRESETS = tuple(name for name, preset in PRESETS.items() if preset.seed_card)
STEPS = ("compress", "vllm", "tensor-parallel", "job")
WORK = REPO / "var" / "gpu-check"
DEFAULT_VLLM_PYTHON = Path(os.environ.get("COMPRESSOR_DATA_DIR") or REPO / "var") / "vllm-venv" / "bin" / "python"
BUILTIN_DIR = MODEL_STORE / BUILTIN_MODEL
JOB_PRESET = "int8-w8a8-gptq"
TENSOR_PARALLEL = 2
BUDGET_S = 8 * 60
TOPICS = ("the ocean", "a mountain", "the moon", "a library", "rain", "a train", "coffee", "a garden")
REFUSAL = 2  # exit status of a refusal (no GPU, bad arguments); 1: a step failed


@dataclass(frozen=True)
class GpuProbe:
    """What .venv's torch sees, asked in a child Python (this process never imports torch)."""

    torch: str
    cuda: str | None
    gpus: tuple[str, ...]
    nvidia_smi: tuple[str, ...]  # `nvidia-smi -L` lines: GPUs the driver sees, whatever torch was built for

    def refusal(self) -> str | None:
        """One sentence saying why this machine cannot run the check; None when it can."""
        if self.gpus:
            return None
        start = "make gpu-check needs an NVIDIA GPU that torch can use"
        if self.nvidia_smi:
            if self.cuda is None:
                why = f".venv's torch {self.torch} was built without CUDA; install PyPI's build (torch==2.13.0 from "
                why += "the default index) and run it again."
            else:
                why = f".venv's torch {self.torch} cannot reach them (check the driver and CUDA_VISIBLE_DEVICES)."
            return f"{start}: nvidia-smi lists {len(self.nvidia_smi)} GPU(s), but {why}"
        return f"{start}, and this machine has none (torch {self.torch}, no nvidia-smi GPU)."

    def summary(self) -> str:
        names = ", ".join(self.gpus)
        return f"{len(self.gpus)} x {names} (torch {self.torch}, CUDA {self.cuda})"


def probe_gpu(python: Path = PYTHON) -> GpuProbe:
    code = (
        "import json, torch\n"
        "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'gpus': [torch.cuda.get_device_name(i) for i in range(n)]}))\n"
    )
    found = subprocess.run([str(python), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    if found.returncode != 0:
        raise RuntimeError(f"torch could not be imported by {python}: {found.stderr.strip()[-500:]}")
    facts = json.loads(found.stdout.strip().splitlines()[-1])
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        smi = ""
    lines = tuple(line for line in smi.splitlines() if line.startswith("GPU "))
    return GpuProbe(torch=facts["torch"], cuda=facts["cuda"], gpus=tuple(facts["gpus"]), nvidia_smi=lines)


@dataclass
class Options:
    presets: tuple[str, ...] = SEED_PRESETS
    skip: frozenset[str] = frozenset()
    vllm_python: Path = DEFAULT_VLLM_PYTHON
    prompts: int = 32
    max_tokens: int = 128
    compiled: bool = False
    out: Path = RESULTS_DIR / "gpu.md"

    def vllm_engine_args(self) -> dict:
        # A small KV cache (the prompts and answers are short) and a third of the GPU: vLLM measures and
        # allocates less, and starts beside whatever else holds the GPU.
        args = {"max_model_len": 2048, "gpu_memory_utilization": 0.3}
        return args if self.compiled else {**args, "enforce_eager": True}

    def prompt_list(self) -> list[str]:
        return [f"Write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(self.prompts)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/part_gpu.py", description="The GPU check (make gpu-check): see the module's docstring."
    )
    parser.add_argument("--probe", action="store_true", help="only check that torch sees a GPU, print it, exit")
    parser.add_argument(
        "--presets",
        default=",".join(SEED_PRESETS),
        help=f"comma-separated presets to compress and load (default the seed presets: {','.join(SEED_PRESETS)})",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=STEPS,
        help="leave a step out (repeatable); 'vllm' leaves vLLM out altogether: no loads, no tensor-parallel "
        "load, the job without its vLLM check",
    )
    parser.add_argument(
        "--vllm-python",
        type=Path,
        default=Path(os.environ.get(VLLM_PYTHON_ENV) or DEFAULT_VLLM_PYTHON),
        help=f"the vLLM environment's Python (default ${VLLM_PYTHON_ENV}, else {DEFAULT_VLLM_PYTHON})",
    )
    parser.add_argument("--prompts", type=int, default=32, help="prompts generated in one batch per load (32)")
    parser.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per prompt at most (128)")
    parser.add_argument(
        "--compiled", action="store_true", help="vLLM with torch.compile and CUDA graphs (its defaults), not eager"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu.md", help="the report (bench/results/gpu.md)")
    return parser


def options_from_args(argv: list[str] | None = None) -> tuple[Options, bool]:
    """The options and whether only the probe was asked for; argparse's exit (status 2) on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    presets = tuple(dict.fromkeys(p.strip() for p in args.presets.split(",") if p.strip()))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        named = ", ".join(unknown) or "(none given)"
        parser.error(f"--presets: unknown preset(s) {named}; known: {', '.join(PRESETS)}")
    for name, value in (("--prompts", args.prompts), ("--max-tokens", args.max_tokens)):
        if value < 1:
            parser.error(f"{name} must be 1 or more, not {value}")
    options = Options(
        presets=presets,
        skip=frozenset(args.skip),
        vllm_python=args.vllm_python,
        prompts=args.prompts,
        max_tokens=args.max_tokens,
        compiled=args.compiled,
        out=args.out,
    )
    return options, args.probe


def vllm_problem(options: Options) -> str | None:
    """Why the vLLM environment cannot be used (None when it can, or --skip vllm leaves vLLM out)."""
    if "vllm" in options.skip:
        return None
    if not options.vllm_python.exists():
        return f"there is no vLLM environment at {options.vllm_python}: run make vllm-env, or give --vllm-python"
    if not vllm_installed(str(options.vllm_python)):
        return f"{options.vllm_python} cannot import vllm: run make vllm-env, or give --vllm-python"
    return None


def tensor_parallel_plan(gpu_count: int, builtin_heads: int) -> tuple[str | None, str]:
    """The tensor-parallel step's model ("builtin", "small-8-heads") or None with the reason it does not run."""
    if gpu_count < TENSOR_PARALLEL:
        return None, f"n/a: {gpu_count} GPU (a tensor-parallel load needs {TENSOR_PARALLEL})"
    if tensor_parallel_problem(builtin_heads, TENSOR_PARALLEL) is None:
        return "builtin", f"the built-in model over {TENSOR_PARALLEL} GPUs"
    return "small-8-heads", (
        f"the built-in model's {builtin_heads} attention heads do not split over {TENSOR_PARALLEL} GPUs: a random "
        f"8-head model (bench/random_model.py --shape small-8-heads) compressed with {JOB_PRESET}"
    )


# --- the steps --------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One run of the check: its rows so far, written to the report after each step."""

    options: Options
    probe: GpuProbe
    figures: list[Figure] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    checkpoints: dict[str, Path] = field(default_factory=dict)

    def step(self, name: str, work: Callable[[], list[Figure]]) -> None:
        print(f"== {name} ==", flush=True)
        started = time.monotonic()
        try:
            new = work()
        except Exception as exc:  # noqa: BLE001 - one failed step must not hide the others
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
            new = [Figure("gpu", f"{name} (failed)", "runs", f"{type(exc).__name__}: {lines[-1]}"[:300], None,
                          "error", lines[-15:])]  # fmt: skip
        for figure in new:
            figure.details.append(f"step '{name}' took {time.monotonic() - started:.0f} s")
            print(f"  {figure.name}: {figure.measured} [{figure.verdict}]", flush=True)
        self.figures.extend(new)
        write_report(self.options.out, self.figures, self.probe, time.monotonic() - self.started)

    @property
    def failed(self) -> bool:
        return any(f.verdict in ("missed", "error") for f in self.figures)


def compress_on_gpu(preset: str, out: Path, *, model: str = BUILTIN_MODEL) -> dict:
    """The engine's command line, as a user runs it (device auto: the GPU); returns its results.json."""
    shutil.rmtree(out, ignore_errors=True)
    command = [str(PYTHON), "-m", "engine", "--preset", preset, "--model", model, "--out", str(out)]
    # No vLLM environment for the engine itself: step 2 loads each checkpoint, with the bf16 model beside it.
    env = {**os.environ, VLLM_PYTHON_ENV: ""}
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"python -m engine --preset {preset} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    results = json.loads((out / "results.json").read_text())
    results["wall_s"] = time.monotonic() - started
    return results


def compress_figures(check: Check) -> list[Figure]:
    figures = []
    for preset in check.options.presets:
        out = WORK / "checkpoints" / preset
        results = compress_on_gpu(preset, out)
        check.checkpoints[preset] = out
        device = results["settings"]["device"]
        timings = results["timings"]
        steps = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items())
        figures.append(
            Figure(
                "gpu",
                f"{preset} on the built-in model by the engine",
                "runs on cuda",
                f"{device}: {results['wall_s']:.0f} s, {results['size_before_bytes'] / 1e6:.0f} -> "
                f"{results['size_after_bytes'] / 1e6:.0f} MB",
                None,
                "met" if device.startswith("cuda") else "missed",
                [f"python -m engine --preset {preset} (a process of its own, imports included); {steps}"],
            )
        )
    return figures


def chat_prompts(model: Path, texts: list[str]) -> list[str]:
    """The prompts in the model's chat template: an instruct model given bare text may answer with its end token
    at once, and leave no tokens to time."""
    template = model / "chat_template.jinja"
    if not template.is_file():
        return texts
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # what transformers renders chat templates with

    render = ImmutableSandboxedEnvironment().from_string(template.read_text()).render
    return [render(messages=[{"role": "user", "content": text}], add_generation_prompt=True) for text in texts]


def vllm_check(check: Check, model: Path, *, tensor_parallel: int = 1) -> dict:
    request = {
        "action": "check",
        "model": str(model),
        "tensor_parallel_size": tensor_parallel,
        "engine_args": check.options.vllm_engine_args(),
        "prompts": chat_prompts(model, check.options.prompt_list()),
        "max_tokens": check.options.max_tokens,
    }
    started = time.monotonic()
    try:
        outcome = run_child(request, python=str(check.options.vllm_python), gpus=list(range(tensor_parallel)))
    except EngineError as exc:
        raise RuntimeError(exc.message[-2000:]) from None
    outcome["wall_s"] = time.monotonic() - started
    return outcome


def _generation_sample(outcome: dict) -> str:
    first = (outcome.get("generations") or [""])[0]
    return " ".join(first.split())[:80]


def vllm_figures(check: Check) -> list[Figure]:
    mode = "compiled (vLLM's defaults)" if check.options.compiled else "eager (enforce_eager)"
    batch = f"{check.options.prompts} prompts in one batch, up to {check.options.max_tokens} greedy tokens each"
    bf16 = vllm_check(check, BUILTIN_DIR)
    figures = [
        Figure(
            "gpu",
            "vLLM (GPU build): the bf16 built-in model",
            "loads and generates",
            f"{bf16['tokens_per_s']:.0f} tokens/s; load {bf16['load_s']:.0f} s",
            None,
            "met" if bf16.get("generated_tokens") else "missed",
            [f"{mode}; {batch}; {bf16['generated_tokens']} tokens", f"first answer: {_generation_sample(bf16)!r}"],
        )
    ]
    for preset in check.options.presets:
        if preset not in check.checkpoints:
            figures.append(Figure("gpu", f"vLLM (GPU build): {preset}", "loads and generates",
                                  "not run: its compression failed", None, "error"))  # fmt: skip
            continue
        try:
            outcome = vllm_check(check, check.checkpoints[preset])
        except RuntimeError as exc:
            last = [ln for ln in str(exc).splitlines() if ln.strip()][-1:] or ["(no output)"]
            figures.append(Figure("gpu", f"vLLM (GPU build): {preset}", "loads and generates", last[0][:300],
                                  None, "error", str(exc).splitlines()[-15:]))  # fmt: skip
            continue
        ratio = outcome["tokens_per_s"] / bf16["tokens_per_s"] if bf16["tokens_per_s"] else None
        figures.append(
            Figure(
                "gpu",
                f"vLLM (GPU build): {preset} / bf16 tokens/s",
                "loads and generates",
                f"{outcome['tokens_per_s']:.0f} vs {bf16['tokens_per_s']:.0f} tokens/s; load {outcome['load_s']:.0f} s",
                ratio,
                "met" if outcome.get("generated_tokens") else "missed",
                [
                    f"{mode}; {batch}; {outcome['generated_tokens']} tokens",
                    f"first answer: {_generation_sample(outcome)!r}",
                ],
            )
        )
    return figures


def tensor_parallel_figures(check: Check) -> list[Figure]:
    builtin_heads = json.loads((BUILTIN_DIR / "config.json").read_text())["num_attention_heads"]
    shape, why = tensor_parallel_plan(len(check.probe.gpus), builtin_heads)
    name = f"vLLM (GPU build): tensor-parallel load over {TENSOR_PARALLEL} GPUs"
    if shape is None:
        return [Figure("gpu", name, f"vLLM runs {TENSOR_PARALLEL} ranks", why, None, "n/a")]
    if shape == "builtin":
        model = check.checkpoints.get(JOB_PRESET) or BUILTIN_DIR
    else:
        base = WORK / "models" / shape
        if not (base / "config.json").is_file():
            build = [str(PYTHON), str(REPO / "bench" / "random_model.py"), str(base), "--shape", shape]
            subprocess.run(build, cwd=REPO, check=True, capture_output=True, timeout=600)
        model = WORK / "checkpoints" / f"{shape}-{JOB_PRESET}"
        compress_on_gpu(JOB_PRESET, model, model=str(base))
    outcome = vllm_check(check, model, tensor_parallel=TENSOR_PARALLEL)
    ranks = outcome.get("tensor_parallel_size")
    return [
        Figure(
            "gpu",
            name,
            f"vLLM runs {TENSOR_PARALLEL} ranks",
            f"{ranks} ranks: {outcome['tokens_per_s']:.0f} tokens/s; load {outcome['load_s']:.0f} s",
            None,
            "met" if ranks == TENSOR_PARALLEL and outcome.get("generated_tokens") else "missed",
            [why, f"first answer: {_generation_sample(outcome)!r}"],
        )
    ]


def job_env(options: Options) -> dict[str, str]:
    """The environment of the check's worker and of this process's Django: its own database and data folder."""
    data = WORK / "data"
    env = {
        "DJANGO_SETTINGS_MODULE": "compressor_app.settings",
        "DJANGO_ENV": "development",
        "COMPRESSOR_DATA_DIR": str(data),
        "COMPRESSOR_MODEL_STORE": str(MODEL_STORE),
        "DATABASE_URL": f"sqlite:///{data / 'db.sqlite3'}",
        "CELERY_KEY_PREFIX": KEY_PREFIX,
        "COMPRESSOR_CACHE_PREFIX": KEY_PREFIX.rstrip(":"),
        "PYTHONUNBUFFERED": "1",
    }
    if "vllm" not in options.skip:
        env[VLLM_PYTHON_ENV] = str(options.vllm_python)
    return env


def job_figures(check: Check) -> list[Figure]:
    """A job through a real GPU worker: submitted by jobs.services in this process, run by `celery worker -Q gpu`."""
    from bench.stack import Process, purge_redis

    shutil.rmtree(WORK / "data", ignore_errors=True)
    (WORK / "data").mkdir(parents=True)
    env = job_env(check.options)
    os.environ.update(env)
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from jobs.inputs import JobInput
    from jobs.models import Job
    from jobs.services import submissions

    call_command("migrate", interactive=False, verbosity=0)
    owner, _ = get_user_model().objects.get_or_create(username="gpu-check")
    argv = [str(REPO / ".venv" / "bin" / "celery"), "-A", "compressor_app", "worker", "-Q", "gpu", "-c", "1"]
    argv += ["-n", f"gpu-check-{os.getpid()}@%h", "-l", "info", "--without-gossip", "--without-mingle"]
    worker = Process("gpu-check-worker", argv, env)
    try:
        # A worker that exited ends the wait too; its log file may not exist yet ("not yet").
        ready = lambda: not worker.alive() or " ready." in worker.log_text()  # noqa: E731
        wait_until(ready, timeout=180, what="the GPU worker", not_yet=(OSError,))
        if not worker.alive():
            raise RuntimeError(f"The worker exited:\n{worker.log_text()[-2000:]}")
        started = time.monotonic()
        submission = submissions.job_submit(
            owner=owner, data=JobInput(preset=JOB_PRESET, device_class=Job.DeviceClass.GPU), force=True
        )
        job = submission.job

        def ended() -> bool:
            job.refresh_from_db()
            return not worker.alive() or job.status in Job.TERMINAL

        wait_until(ended, timeout=900, interval=0.5, what=f"job {job.pk} to end")
        wall = time.monotonic() - started
        if job.status not in Job.TERMINAL:
            raise RuntimeError(f"The worker exited during job {job.pk}:\n{worker.log_text()[-2000:]}")
    finally:
        worker.stop()
        purge_redis()
    if job.status != Job.Status.SUCCEEDED:
        raise RuntimeError(f"job {job.pk} {job.status}: {job.error}")
    results = job.results or {}
    settings = results.get("settings") or {}
    device = settings.get("device", "?")
    vllm = settings.get("vllm_check") or {}
    if vllm.get("ran") and not vllm.get("error"):
        checked = f"checked in vLLM on the {vllm.get('device')}: {vllm.get('tokens_per_s') or 0:.0f} tokens/s"
    else:
        checked = f"vLLM check: {vllm.get('error') or vllm.get('reason') or 'not recorded'}"
    steps = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in (results.get("timings") or {}).items())
    checked_on_gpu = vllm.get("ran") and vllm.get("device") == "cuda" and not vllm.get("error")
    vllm_ok = "vllm" in check.options.skip or checked_on_gpu
    return [
        Figure(
            "gpu",
            f"A {JOB_PRESET} job through a real GPU worker",
            "succeeds on cuda, checked in vLLM on the GPU",
            f"{device}, {wall:.0f} s from submission; {checked}",
            None,
            "met" if device.startswith("cuda") and vllm_ok else "missed",
            [
                "celery worker -Q gpu -c 1 (prefork, the child's first job: its imports included), submitted by "
                "jobs.services.submissions.job_submit, device class gpu",
                f"engine: {steps}",
                f"worker log: {worker.log_path}",
            ],
        )
    ]


def run_check(options: Options, probe: GpuProbe) -> Check:
    check = Check(options, probe)
    (WORK / "checkpoints").mkdir(parents=True, exist_ok=True)
    if "compress" not in options.skip:
        check.step("compress", lambda: compress_figures(check))
    if "vllm" not in options.skip:
        check.step("vllm", lambda: vllm_figures(check))
    if not {"vllm", "tensor-parallel"} & options.skip:
        check.step("tensor-parallel", lambda: tensor_parallel_figures(check))
    if "job" not in options.skip:
        check.step("job", lambda: job_figures(check))
    return check


# --- the report ---------------------------------------------------------------------------------------------


def write_report(path: Path, figures: list[Figure], probe: GpuProbe, elapsed_s: float) -> Path:
    machine = machine_info()
    lines = ["# GPU check (make gpu-check)", ""]
    lines += [f"- **GPU**: {probe.summary()}"]
    lines += [f"- **{key}**: {value}" for key, value in machine.items() if key != "load average at start"]
    within = "within" if elapsed_s <= BUDGET_S else "over"
    lines += [f"- **wall time**: {elapsed_s:.0f} s ({within} the {BUDGET_S // 60}-minute budget)", ""]
    lines += table(figures)
    lines += ["", "## Details", ""]
    for figure in figures:
        if figure.details:
            lines.append(f"### {figure.name}")
            lines += [f"- {d}" for d in figure.details]
            lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# --- entry points ---------------------------------------------------------------------------------------------


def run(stack=None) -> list[Figure]:
    """Part 6 of `make bench`: the whole check where torch sees a GPU, else n/a. In a process of its own: its job
    step configures Django with the check's database, and the bench's process is configured with the bench's."""
    name = "GPU check (make gpu-check): rows met"
    if refusal := probe_gpu().refusal():
        return [Figure("gpu", name, "all", f"n/a: {refusal}", verdict="n/a")]
    command = [str(PYTHON), str(Path(__file__).resolve())]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=2 * BUDGET_S)
    if done.returncode == REFUSAL:
        return [Figure("gpu", name, "all", f"n/a: {done.stderr.strip()[-300:]}", verdict="n/a")]
    rows = [line.strip() for line in done.stdout.splitlines() if line.startswith("  ") and line.rstrip().endswith("]")]
    met = sum(row.endswith("[met]") for row in rows)
    return [
        Figure("gpu", name, "all", f"{met} of {len(rows)} (bench/results/gpu.md)", None,
               verdict(done.returncode == 0), rows)
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    options, probe_only = options_from_args(argv)
    probe = probe_gpu()
    if refusal := probe.refusal():
        print(refusal, file=sys.stderr)
        return REFUSAL
    print(f"GPU: {probe.summary()}", flush=True)
    if probe_only:
        return 0
    if problem := vllm_problem(options):
        print(f"make gpu-check needs vLLM's GPU build: {problem} (or --skip vllm --skip tensor-parallel).",
              file=sys.stderr)  # fmt: skip
        return REFUSAL
    check = run_check(options, probe)
    print(f"\nWritten to {options.out} ({time.monotonic() - check.started:.0f} s in all)")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
