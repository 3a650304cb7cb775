"""The baseline of the job-time benchmark: the same oneshot as a bare llm-compressor script.

Only transformers, datasets and llm-compressor: no engine, no Django. It loads the model, loads the
pre-tokenized calibration set the harness saved with datasets' save_to_disk (built with engine.calibration,
so both runs see identical tokens), runs oneshot with the same recipe YAML and saves the compressed
checkpoint. It prints one JSON line of timings (seconds since the process started, and per phase).

    python bench/bare_oneshot.py --model DIR --recipe recipe.yaml [--dataset DIR --max-seq-len 256] --out DIR
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a bf16 safetensors model folder")
    parser.add_argument("--recipe", required=True, help="an llm-compressor recipe YAML file")
    parser.add_argument("--dataset", help="a datasets.save_to_disk folder of input_ids/attention_mask rows")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--out", required=True, help="the output folder")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timings: dict[str, float] = {"import_s": time.perf_counter() - t0}

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    kwargs: dict = {}
    if args.dataset:
        from datasets import load_from_disk

        dataset = load_from_disk(args.dataset)
        kwargs = {
            "dataset": dataset,
            "num_calibration_samples": len(dataset),
            "max_seq_length": args.max_seq_len,
            "shuffle_calibration_samples": False,
        }
    with open(args.recipe, encoding="utf-8") as handle:
        recipe = handle.read()
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **kwargs)
    timings["oneshot_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    timings["save_s"] = time.perf_counter() - t0

    timings["total_in_process_s"] = time.perf_counter() - PROCESS_START
    # ru_maxrss is in KiB on Linux: the peak resident memory of this process.
    timings["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sys.stdout.flush()
    print("BARE_RESULT " + json.dumps(timings), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
