"""Inputs of the bare baseline, made by the engine so both runs see the same bytes.

    python bench/prepare_inputs.py OUT_DIR PRESET [PRESET ...]

For each preset: OUT_DIR/<preset>.yaml, the recipe preflight resolves (what the service runs). If any preset
needs calibration: OUT_DIR/calibration, the tokenized built-in calibration set (engine.calibration with the
API's defaults: 32 samples x 256 tokens) saved with datasets' save_to_disk. Prints one JSON line.
Run in its own process, so the harness never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str]) -> int:
    from transformers import AutoTokenizer

    from engine import calibration as calib
    from engine.preflight import preflight
    from engine.spec import CalibrationSpec, CompressionSpec

    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"presets": {}}
    spec_cal = CalibrationSpec()  # kind builtin, 32 samples, 256 tokens: the API's defaults
    needs = False
    for preset in argv[1:]:
        report = preflight(CompressionSpec(preset=preset, calibration=spec_cal, device="cpu"))
        (out / f"{preset}.yaml").write_text(report.recipe_yaml)
        info["model_path"] = str(report.model.path)
        info["model_bytes"] = report.model.weights_bytes
        info["presets"][preset] = {"recipe": str(out / f"{preset}.yaml"), "needs_calibration": report.needs_calibration}
        needs = needs or report.needs_calibration
    if needs:
        tokenizer = AutoTokenizer.from_pretrained(info["model_path"])
        dataset = calib.tokenize_records(calib.load_records(spec_cal), tokenizer, spec_cal)
        target = out / "calibration"
        shutil.rmtree(target, ignore_errors=True)
        dataset.save_to_disk(str(target))
        input_ids = dataset.to_dict()["input_ids"]
        digest = hashlib.sha256(json.dumps(input_ids).encode()).hexdigest()
        info.update(
            calibration=str(target),
            calibration_rows=len(dataset),
            calibration_tokens=sum(len(ids) for ids in input_ids),
            calibration_sha256=digest,
            max_seq_len=spec_cal.max_seq_len,
        )
    print("PREPARED " + json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
