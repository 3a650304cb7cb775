"""lm-eval tasks the project ships: generated locally as JSONL, so the lm-eval path runs offline.

Both are multiple-choice tasks scored by log-likelihood (fast on a CPU), generated from a fixed seed so
that every run sees the same items:
- compressor_arithmetic (3-shot): "What is 17 * 4?", the answer among three near misses;
- compressor_continuation (0-shot): the next five words of a sentence of Python's documentation topics
  (the held-out text, never used for calibration), among three spans taken from other sentences.
The built-in 135M model scores about 44 % and 77 % on them (25 % is chance): well above chance, so
their recovery says something.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

from engine.artifacts import write_if_changed

LOCAL_TASKS = ("compressor_arithmetic", "compressor_continuation")
_ITEMS = 100
_CONTINUATION_WORDS = 5

_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    train: {train}
test_split: test
fewshot_split: train
num_fewshot: {shots}
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: {prompt}
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    op = rng.choice(["+", "-", "*"])
    answer = str({"+": a + b, "-": a - b, "*": a * b}[op])
    wrong: set[str] = set()
    while len(wrong) < 3:
        candidate = str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 3, 10]))
        if candidate != answer:
            wrong.add(candidate)
    return _multiple_choice(f"What is {a} {op} {b}?", answer, sorted(wrong), rng)


def _continuation(rng: random.Random) -> dict:
    sentences = _sentences()
    words = rng.choice(sentences).split()
    cut = rng.randint(8, len(words) - _CONTINUATION_WORDS)
    answer = " ".join(words[cut : cut + _CONTINUATION_WORDS])
    wrong: list[str] = []
    while len(wrong) < 3:
        other = rng.choice(sentences).split()
        start = rng.randint(3, len(other) - _CONTINUATION_WORDS)
        span = " ".join(other[start : start + _CONTINUATION_WORDS])
        if span != answer and span not in wrong:
            wrong.append(span)
    return _multiple_choice(" ".join(words[:cut]), answer, wrong, rng)


@functools.cache
def _sentences() -> list[str]:
    """Plain-prose sentences of 14 to 40 words from pydoc_data.topics (no code, no markup)."""
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics[key] for key in sorted(topics)).split())
    candidates = (s.strip() for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in candidates if 14 <= len(s.split()) <= 40 and re.fullmatch(r"[A-Za-z][A-Za-z ,;:'()\-.]+", s)]


def _multiple_choice(question: str, answer: str, wrong: list[str], rng: random.Random) -> dict:
    choices = [answer, *wrong]
    rng.shuffle(choices)
    # No leading space: lm-eval puts its target_delimiter (" ") between the prompt and each choice.
    return {"question": question, "choices": choices, "label": choices.index(answer)}


# name: (item generator, few-shot count, lm-eval prompt template)
_TASKS: dict[str, tuple[Callable[[random.Random], dict], int, str]] = {
    "compressor_arithmetic": (_arithmetic, 3, '"Question: {{question}}\\nAnswer:"'),
    "compressor_continuation": (_continuation, 0, '"{{question}}"'),
}


def write_local_tasks(folder: Path) -> Path:
    """Write the local tasks' JSONL and YAML into folder (idempotent); return it for TaskManager."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (generate, shots, prompt) in _TASKS.items():
        rng = random.Random(name)  # a fixed seed per task: the same items on every machine
        test, train = folder / f"{name}.jsonl", folder / f"{name}-fewshot.jsonl"
        write_if_changed(test, _jsonl(generate(rng) for _ in range(_ITEMS)))
        write_if_changed(train, _jsonl(generate(rng) for _ in range(max(shots, 1))))
        # A JSON string is valid YAML: any folder name stays one scalar.
        paths = {"test": json.dumps(str(test)), "train": json.dumps(str(train))}
        write_if_changed(folder / f"{name}.yaml", _TASK_YAML.format(name=name, shots=shots, prompt=prompt, **paths))
    for stale in folder.glob("compressor_*.yaml"):  # a task an earlier version shipped
        if stale.stem not in _TASKS:
            stale.unlink(missing_ok=True)
    return folder


@functools.cache
def known_task_names(folder: Path) -> frozenset[str]:
    """Every task, group and tag name lm-eval can run here, the local tasks included.

    lm-eval builds its index by reading thousands of YAML files (15 s or more); the names are kept in a file
    per lm-eval version beside the local tasks, so only the first call on a machine pays for it, and in
    memory, so a process reads the file once (jobs.apps, as it starts).
    """
    import lm_eval

    cache = folder / f"task-names-{lm_eval.__version__}.json"
    try:
        return frozenset(json.loads(cache.read_text())) | frozenset(LOCAL_TASKS)
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager(include_path=str(write_local_tasks(folder))).all_tasks)
    write_if_changed(cache, json.dumps(names))
    return frozenset(names) | frozenset(LOCAL_TASKS)


def tasks_dir() -> Path:
    """Where the local tasks' files and lm-eval's task index live: beside the model store, unless set."""
    from engine.model_sources import default_store

    return Path(os.environ.get("COMPRESSOR_TASKS_DIR") or default_store().parent / "lm_tasks")


def _jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)
