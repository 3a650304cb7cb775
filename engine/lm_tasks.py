"""lm-eval tasks the project ships: generated locally as JSONL, so the lm-eval path runs offline.

Both are multiple-choice tasks scored by log-likelihood (fast on a CPU): integer arithmetic, and the
next number of a simple sequence. They are generated from a fixed seed, so every run sees the same items.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LOCAL_TASKS = ("compressor_arithmetic", "compressor_sequences")
_ITEMS = 100

_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    op = rng.choice(["+", "-", "*"])
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return _multiple_choice(f"What is {a} {op} {b}?", answer, rng)


def _sequence(rng: random.Random) -> dict:
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    shown = [start + step * i for i in range(4)]
    question = f"What number comes next: {', '.join(map(str, shown))}, ?"
    return _multiple_choice(question, start + step * 4, rng)


def _multiple_choice(question: str, answer: int, rng: random.Random) -> dict:
    wrong = set()
    while len(wrong) < 3:
        candidate = answer + rng.choice([-10, -2, -1, 1, 2, 3, 10])
        if candidate != answer:
            wrong.add(candidate)
    choices = [str(answer), *map(str, wrong)]
    rng.shuffle(choices)
    return {"question": question, "choices": [f" {c}" for c in choices], "label": choices.index(str(answer))}


_GENERATORS = {"compressor_arithmetic": _arithmetic, "compressor_sequences": _sequence}


def write_local_tasks(folder: Path) -> Path:
    """Write the local tasks' JSONL and YAML into folder (idempotent); return it for TaskManager."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, generate in _GENERATORS.items():
        rng = random.Random(name)  # a fixed seed per task: the same items on every machine
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(generate(rng)) + "\n" for _ in range(_ITEMS)))
        (folder / f"{name}.yaml").write_text(_TASK_YAML.format(name=name, data=data))
    return folder
