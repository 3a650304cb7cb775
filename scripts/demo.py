"""Submit the built-in model through the REST API, follow it with a progress bar, print the page and results.

    python scripts/demo.py --url http://127.0.0.1:8000 --token-file var/run/demo-token

Only the public API is used (token authentication), as any program would.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import requests
from tqdm import tqdm

from engine.card import results_table
from engine.units import size_text

TERMINAL = {"succeeded", "failed", "cancelled"}
ENGINE_LOG_PREFIXES = ("INFO:", "DEBUG:", "METRIC:", "WARNING:", "SUCCESS:", "TRACE:")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--token", help="API token (or --token-file)")
    parser.add_argument("--token-file", type=Path)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--preset", default="int8-w8a8-gptq")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation (faster)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--reuse", action="store_true", help="accept an earlier identical result (no force)")
    parser.add_argument("--queue-timeout", type=float, default=300, help="give up if no worker starts it (s)")
    args = parser.parse_args(argv)

    token = args.token or (args.token_file.read_text().strip() if args.token_file else None)
    if not token:
        parser.error("give --token or --token-file")
    api = requests.Session()
    api.headers["Authorization"] = f"Token {token}"
    base = args.url.rstrip("/")

    body = {
        "model": args.model,
        "preset": args.preset,
        "calibration": {"kind": "builtin", "samples": args.samples, "max_seq_len": args.max_seq_len},
        "force": not args.reuse,
        # The offline suite (perplexity, KL, top-1 agreement, generations): the seed cards' table.
        "evaluation": None if args.no_eval else {"offline": True},
    }
    submitted = time.monotonic()
    response = api.post(f"{base}/api/v1/jobs/", json=body, timeout=120)
    if response.status_code not in (200, 201):
        print(f"The service refused the job ({response.status_code}): {response.text}", file=sys.stderr)
        return 1
    job = response.json()
    submitted_id = job["id"]
    print(
        f"Job {job['id']} submitted: {args.model} with {args.preset}"
        + (" (earlier identical result)" if job["duplicate"] else "")
    )

    job = follow(api, base, job, queue_timeout=args.queue_timeout)
    if job is None:
        print(
            f"No worker took job {submitted_id} within {args.queue_timeout:.0f} s; is a worker running? "
            "(scripts/services.sh status, logs in var/run/)",
            file=sys.stderr,
        )
        return 1
    if job["status"] != "succeeded":
        print(f"Job {job['id']} {job['status']}: {job['error'] or job['message']}", file=sys.stderr)
        print(f"Job page: {base}/jobs/{job['id']}/", file=sys.stderr)
        return 1
    manifest = api.get(f"{base}/api/v1/jobs/{job['id']}/manifest/", timeout=60)
    manifest.raise_for_status()
    downloadable_s = time.monotonic() - submitted
    report(base, job, manifest.json(), downloadable_s)
    return 0


def follow(api: requests.Session, base: str, job: dict, *, queue_timeout: float) -> dict | None:
    """Poll the job and its log until it ends, drawing the overall percent as a bar (None: never started)."""
    cursor = 0
    waiting_since = time.monotonic()
    with tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} % [{elapsed}]") as bar:
        while True:
            job = api.get(f"{base}/api/v1/jobs/{job['id']}/", timeout=30).json()
            logs = api.get(f"{base}/api/v1/jobs/{job['id']}/logs/", params={"after": cursor}, timeout=30).json()
            cursor = logs["cursor"]
            for line in logs["lines"]:
                if not line["text"].startswith(ENGINE_LOG_PREFIXES):
                    bar.write(f"  {line['text']}")
            step = f" {job['step']}/{job['total']}" if job["step"] and job["total"] else ""
            where = f"queue #{job['queue_position']}" if job["status"] == "queued" else f"{job['stage']}{step}"
            bar.set_description(where)
            bar.n = job["percent"] or 0
            bar.refresh()
            if job["status"] in TERMINAL:
                return job
            if job["status"] == "queued" and time.monotonic() - waiting_since > queue_timeout:
                return None
            time.sleep(0.5)


def report(base: str, job: dict, manifest: dict, downloadable_s: float) -> None:
    results = job["results"] or {}
    print()
    print(f"Job page:            {base}/jobs/{job['id']}/   (log in as the demo user)")
    # Sizes in the units of the job page and the card (engine.units: decimal MB).
    print(f"Size:                {size_text(results.get('size_before_bytes'))} -> "
          f"{size_text(results.get('size_after_bytes'))} "
          f"(compression ratio {results.get('compression_ratio', 0):.2f}x)")  # fmt: skip
    timings = results.get("timings") or {}
    print("Engine timings:      " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    evaluation = results.get("evaluation")
    if evaluation:
        print()
        print(results_table(evaluation, baseline_name=job["model"], compressed_name=f"job {job['id']}"))
        print()
    total = size_text(manifest.get("total_bytes"))
    print(f"Files:               {len(manifest['files'])} files, {total}, sha256 in the manifest")
    print(f"Download (zip):      {base}/api/v1/jobs/{job['id']}/archive/")
    print(f"Manifest:            {base}/api/v1/jobs/{job['id']}/manifest/")
    print(f"Submission to downloadable checkpoint: {downloadable_s:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
