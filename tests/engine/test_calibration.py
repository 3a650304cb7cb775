import json

import pytest
from transformers import AutoTokenizer

from engine.calibration import builtin_records, load_records, read_jsonl, tokenize_records
from engine.errors import EngineError
from engine.spec import CalibrationSpec


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "fine"}', "{not json}"], "Line 2: not valid JSON"),
        (['{"text": "fine"}', "", '["a list"]'], "Line 3: expected an object"),
        (['{"prompt": "x"}'], 'Line 1: expected a "text" or a "messages" field'),
        (['{"text": ""}'], 'Line 1: "text" must be a non-empty string'),
        (['{"messages": [{"role": "user"}]}'], 'Line 1: "messages" must be a non-empty list'),
    ],
)
def test_malformed_jsonl_names_the_line_and_the_problem(tmp_path, lines, message):
    path = write_lines(tmp_path / "cal.jsonl", lines)
    with pytest.raises(EngineError, match=message) as info:
        read_jsonl(path)
    assert info.value.field == "calibration"


def test_missing_calibration_file_is_a_clear_error(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        load_records(CalibrationSpec(kind="jsonl", path=str(tmp_path / "nope.jsonl")))


def test_builtin_set_is_generated_chat_text():
    records = builtin_records()
    assert len(records) >= 128
    assert all(r["messages"][1]["content"] for r in records)
    assert len({r["messages"][0]["content"] for r in records}) == len(records)  # no duplicates


def test_chat_rows_use_the_chat_template_without_a_double_bos(tmp_path, builtin_model):
    tokenizer = AutoTokenizer.from_pretrained(builtin_model)
    rows = [
        {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]},
        {"text": "Plain text is tokenized as it is."},
    ]
    path = write_lines(tmp_path / "cal.jsonl", [json.dumps(r) for r in rows])
    spec = CalibrationSpec(kind="jsonl", path=str(path), samples=2, max_seq_len=16)
    dataset = tokenize_records(load_records(spec), tokenizer, spec)
    chat_ids = dataset[0]["input_ids"]
    expected = tokenizer(tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False), add_special_tokens=False)
    assert chat_ids == expected["input_ids"][:16]
    assert tokenizer.decode(chat_ids).startswith("<|im_start|>system")
    assert chat_ids[1] != chat_ids[0] or chat_ids[0] != tokenizer.bos_token_id
    assert all(len(ids) <= 16 for ids in dataset["input_ids"])


def test_the_model_cards_code_makes_the_built_in_rows_without_the_service():
    from engine.calibration import builtin_records, builtin_records_code

    code = builtin_records_code()
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - our own generated code, as a reader of the card would run it
    assert "engine" not in code and namespace["rows"] == builtin_records()
