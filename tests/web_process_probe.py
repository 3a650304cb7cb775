"""Run as its own process (python tests/web_process_probe.py USERNAME JOB_ID HUB_MODEL): a web process that
serves every page and API endpoint once through Django's test client, submits a hub model through the API
and the form, then prints which of the heavy libraries it imported, as JSON on its last line.

The Django settings, the database and the hub come from the environment, as for a real web process.
"""

from __future__ import annotations

import json
import re
import sys

import django

HEAVY = ("torch", "transformers", "llmcompressor", "compressed_tensors", "datasets")


def _routes(patterns, prefix: str = "") -> list[str]:
    """Every URL route of the project, with each <converter:name> and regex group left as a placeholder."""
    from django.urls import URLResolver

    routes = []
    for pattern in patterns:
        text = prefix + str(pattern.pattern).lstrip("^").rstrip("$")
        if isinstance(pattern, URLResolver):
            routes += _routes(pattern.url_patterns, text)
        else:
            routes.append(text)
    return routes


def _url(route: str, job_id: int) -> str:
    """The route with every placeholder filled by the job's id (a 404 is fine: the view still ran)."""
    route = re.sub(r"<[^>]+>", str(job_id), route)
    route = re.sub(r"\(\?P<[^>]+>[^)]*\)", str(job_id), route)
    return "/" + route.replace("\\", "")


def main(username: str, job_id: int, hub_model: str) -> None:
    django.setup()
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import get_resolver

    client = Client()
    client.force_login(get_user_model().objects.get(username=username))
    statuses = {}
    for route in sorted(set(_routes(get_resolver().url_patterns))):
        url = _url(route, job_id)
        statuses[url] = client.get(url).status_code
        statuses[f"{url}?format=json"] = client.get(url, {"format": "json"}).status_code
    body = {"model": hub_model, "preset": "w4a16-gptq", "calibration": {"kind": "builtin"}, "force": True}
    statuses["POST /api/v1/jobs/"] = client.post("/api/v1/jobs/", body, content_type="application/json").status_code
    form = {
        "model_source": "hub",
        "hub_id": hub_model,
        "preset": "fp8-dynamic",
        "calibration_kind": "none",
        "calibration_split": "train",
        "calibration_column": "text",
        "calibration_samples": "8",
        "calibration_max_seq_len": "128",
        "priority": "5",
        "device_class": "cpu",
    }
    statuses["POST /jobs/new/"] = client.post("/jobs/new/", form).status_code
    for action in ("cancel", "retry"):
        statuses[f"POST {action}"] = client.post(f"/api/v1/jobs/{job_id}/{action}/").status_code
    print(json.dumps({"imported": [name for name in HEAVY if name in sys.modules], "statuses": statuses}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
