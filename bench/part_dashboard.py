"""Part 4, the dashboard with history: 10 000 jobs in PostgreSQL, p95 latency of the list pages and of the
admin's queue page.

The history is bulk-created through the ORM (realistic rows: results with sizes, timings and per-layer
errors, manifests; spread over 90 days; the newest few still queued or running), topping the database up to
the wanted count. Measured over loopback against the bench's web server: the API list (page 1 and the last
page), the jobs page "/" (with a signed-in session) and the admin queue page (a staff session), requests
alternating. Queries per page are counted in-process (django.test.Client + CaptureQueriesContext on the same
database): they must not grow with the history or the page (tests/bench/test_query_counts.py asserts the
same for the API list and the admin's queue page and job list).
"""

from __future__ import annotations

import math
import random
import time

import requests

from bench.common import Figure, percentile, verdict
from bench.stack import Stack, bench_user
from tests.support import wait_until

TARGET_MS = 150.0
PRESET_NAMES = ("fp8-dynamic", "int8-w8a8-gptq", "w4a16-gptq", "fp8-static", "sparse24-fp8-dynamic")


def _results(preset: str, rng: random.Random) -> dict:
    layers = 30 if "gptq" in preset or "sparse" in preset else 0
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    errors = [
        {"module": f"model.layers.{layer}.{name}", "error": round(rng.uniform(0.01, 600), 3)}
        for layer in range(layers)
        for name in names
    ]
    baseline = rng.uniform(10, 20)
    return {
        "output_dir": "jobs/0/checkpoint",
        "size_before_bytes": 269_060_552,
        "size_after_bytes": rng.randint(100_000_000, 180_000_000),
        "compression_ratio": 1.7,
        "timings": {"load_s": 0.5, "compress_s": rng.uniform(1, 60), "save_s": 0.8, "hash_s": 0.2},
        "layer_errors": errors,
        "evaluation": {
            "headline": "perplexity",
            "metrics": [{"name": "perplexity", "baseline": baseline, "compressed": baseline * 1.03}],
        },
    }


def _manifest(rng: random.Random) -> dict:
    names = ["config.json", "generation_config.json", "model.safetensors", "recipe.yaml", "results.json"]
    names += ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    files = [
        {"path": n, "size": rng.randint(100, 200_000_000), "sha256": f"{rng.getrandbits(256):064x}"} for n in names
    ]
    return {"files": files, "total_bytes": sum(f["size"] for f in files), "model": "smollm2-135m-instruct"}


def seed_history(owner, total: int, *, batch: int = 1000) -> tuple[int, float]:
    """Bulk-create jobs until the table holds `total`; returns (created, seconds)."""
    from django.db import connection
    from django.utils import timezone

    from jobs.models import Job

    started = time.perf_counter()
    existing = Job.objects.count()
    missing = max(0, total - existing)
    rng = random.Random(42)
    first_new = None
    for offset in range(0, missing, batch):
        rows = []
        for i in range(offset, min(missing, offset + batch)):
            preset = PRESET_NAMES[i % len(PRESET_NAMES)]
            roll = rng.random()
            status = Job.Status.SUCCEEDED if roll < 0.85 else Job.Status.FAILED if roll < 0.95 else Job.Status.CANCELLED
            job = Job(owner=owner, preset=preset, status=status, queue="gpu", percent=100.0, attempt=1)
            if status == Job.Status.SUCCEEDED:
                job.stage, job.message = Job.Stage.DONE, "Checkpoint ready"
                job.results, job.manifest = _results(preset, rng), _manifest(rng)
                job.artifacts_path = "jobs/0/checkpoint"
            elif status == Job.Status.FAILED:
                job.error = "The calibration dataset could not be loaded: the Hugging Face hub cannot be reached."
            rows.append(job)
        created = Job.objects.bulk_create(rows)
        if first_new is None and created:
            first_new = created[0].pk
    if first_new is not None:
        now = timezone.now()
        with connection.cursor() as cursor:
            # Spread the new history over 90 days (auto_now_add stamped them all "now"), oldest first.
            cursor.execute(
                "UPDATE jobs_job SET created_at = %s - (%s - id) * interval '1 second' * %s, "
                "started_at = %s - (%s - id) * interval '1 second' * %s, "
                "finished_at = %s - (%s - id) * interval '1 second' * %s + interval '40 seconds' "
                "WHERE id >= %s",
                [now, first_new + missing, 90 * 86400 / max(1, missing)] * 3 + [first_new],
            )
        # The newest few are still in flight (and on page 1): queued rows have a queue position on the list.
        newest = list(Job.objects.filter(pk__gte=first_new).order_by("-pk").values_list("pk", flat=True)[:6])
        Job.objects.filter(pk__in=newest[1:]).update(
            status=Job.Status.QUEUED,
            stage=Job.Stage.WAITING,
            results=None,
            manifest=None,
            finished_at=None,
            started_at=None,
            created_at=now,
        )
        Job.objects.filter(pk__in=newest[:1]).update(
            status=Job.Status.RUNNING,
            stage=Job.Stage.CALIBRATING,
            results=None,
            manifest=None,
            finished_at=None,
            started_at=now,
            created_at=now,
        )
    with connection.cursor() as cursor:
        # The table as autovacuum leaves it a minute after a bulk load. Fresh statistics: without them the
        # planner sorts the whole table (on disk) for a deep page instead of walking the created_at index. The
        # visibility map: without it the stored-bytes quota of each later submission (the hub_submission part)
        # reads the 8 300 succeeded rows from the heap (10 ms) instead of their index entries (1.4 ms).
        cursor.execute("VACUUM ANALYZE jobs_job")
    return missing, time.perf_counter() - started


def count_queries(path: str, user) -> tuple[int, int]:
    """(status code, queries) of one GET through django.test.Client, signed in as user."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client()
    client.force_login(user)
    client.get(path)  # warm (session, content types)
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(path)
    return response.status_code, len(ctx.captured_queries)


def _live_workers(stack: Stack) -> str:
    """A real Celery worker answering while the pages are measured: it registers itself (the admin queue page
    lists it from what it last reported) and answers the admin's "Ask the workers now"."""
    from jobs.models import WorkerNode

    stack.start_worker()
    wait_until(
        lambda: any(node.is_online() for node in WorkerNode.objects.all()),
        timeout=120,
        what="the bench's worker to register itself",
    )
    return f"{sum(node.is_online() for node in WorkerNode.objects.all())} worker live"


def session_cookie(user) -> str:
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def run(stack: Stack, *, jobs: int = 10_000, requests_per_page: int = 100) -> list[Figure]:
    from django.conf import settings

    from jobs.models import Job

    created, seed_s = seed_history(stack.user, jobs)
    count = Job.objects.count()
    workers = _live_workers(stack)
    last_page = max(1, math.ceil(Job.objects.filter(owner=stack.user).count() / 25))
    print(f"  history: {count} jobs ({created} created in {seed_s:.1f} s), {last_page} pages", flush=True)

    api = stack.api.new_session()
    page = requests.Session()
    page.cookies.set(settings.SESSION_COOKIE_NAME, session_cookie(stack.user), domain="127.0.0.1")
    operator_user, _token = bench_user("bench-operator", staff=True)
    operator = requests.Session()
    operator.cookies.set(settings.SESSION_COOKIE_NAME, session_cookie(operator_user), domain="127.0.0.1")

    targets = {
        "API list page 1": (api, "/api/v1/jobs/"),
        f"API list page {last_page}": (api, f"/api/v1/jobs/?page={last_page}"),
        "jobs page /": (page, "/"),
        f"jobs page /?page={last_page}": (page, f"/?page={last_page}"),
        f"admin queue page ({workers})": (operator, "/admin/jobs/job/queue/"),
    }
    # Is the jobs page there (and is it the jobs page, not a sign-in redirect)?
    probe = page.get(stack.base + "/", allow_redirects=False, timeout=30)
    page_available = probe.status_code == 200
    if not page_available:
        targets = {k: v for k, v in targets.items() if not k.startswith("jobs page")}

    latencies: dict[str, list[float]] = {name: [] for name in targets}
    sizes: dict[str, int] = {}
    for name, (session, path) in targets.items():  # warm-up
        for _ in range(3):
            response = session.get(stack.base + path, allow_redirects=False, timeout=60)
            if response.status_code != 200:
                raise RuntimeError(f"{name}: {path} answered {response.status_code}")
            sizes[name] = len(response.content)
    deadline = time.monotonic() + 240
    for _ in range(requests_per_page):
        for name, (session, path) in targets.items():
            started = time.perf_counter()
            response = session.get(stack.base + path, allow_redirects=False, timeout=60)
            latencies[name].append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"{name}: {path} answered {response.status_code}")
        if time.monotonic() > deadline:
            break

    queries = {
        name: count_queries(path, operator_user if session is operator else stack.user)
        for name, (session, path) in targets.items()
    }
    figures = []
    for name, values in latencies.items():
        p95 = percentile(values, 95) * 1000
        p50 = percentile(values, 50) * 1000
        status, nq = queries[name]
        figures.append(
            Figure(
                "dashboard",
                f"Dashboard {name} p95 ({count} jobs)",
                f"< {TARGET_MS:.0f} ms",
                f"{p95:.0f} ms (median {p50:.0f}, {nq} queries, {sizes[name] / 1000:.0f} kB)",
                p95 / TARGET_MS,
                verdict(p95 < TARGET_MS),
                [f"{len(values)} requests, alternating with the other pages; {nq} SQL queries (in-process count)"],
            )
        )
    if not page_available:
        figures.append(
            Figure(
                "dashboard",
                "Dashboard jobs page / p95",
                f"< {TARGET_MS:.0f} ms",
                f"n/a (GET / answered {probe.status_code})",
                verdict="n/a",
            )
        )
    # Constant queries per page: the same pages with a small history must cost as many queries.
    api_counts = sorted({queries[n][1] for n in queries if n.startswith("API")})
    page_counts = sorted({queries[n][1] for n in queries if n.startswith("jobs page")})
    queued = Job.objects.filter(status=Job.Status.QUEUED).count()
    for label, counts in (("API list", api_counts), ("jobs page", page_counts)):
        if not counts:
            continue
        # A query per row (say, each waiting job's queue position) adds one per queued job on page 1; one more
        # there is a page's single query for all its positions (selectors.queue_positions), as many rows or not.
        per_page = counts[-1] - counts[0] <= 1 < queued
        figures.append(
            Figure(
                "dashboard",
                f"Dashboard {label}: queries per page (page 1 vs last)",
                "none per row",
                " vs ".join(str(queries[n][1]) for n in queries if n.startswith(label.split()[0])),
                None,
                verdict(per_page),
                [
                    f"page 1 holds {queued} queued jobs and 1 running, the last page none: a query per row would "
                    f"show as {queued} or more queries on page 1 than on the last page"
                ],
            )
        )
    return figures
