"""Fixtures for the dashboard tests: users, signed-in clients, jobs in every state, and for the browser
tests a real Celery worker process, a live server and Debian's headless Chromium driven by Playwright.

How the worker sees the live server's data: on SQLite the test database is a file (set below through
the DATABASES TEST NAME, the same way tests/jobs does it), so `celery worker` in another process opens
the same file; on PostgreSQL it is pytest-django's test_<name> database. The worker also gets this
session's media folder and its own Redis key prefix, so parallel runs never take each other's messages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    QUEUES,
    REPO,
    start_worker_process,
    stop_worker_process,
    wait_for_worker,
    worker_env,
)

SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("COMPRESSOR_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def current_media_root() -> Path:
    from django.conf import settings

    return Path(settings.MEDIA_ROOT)


# --- users and jobs -------------------------------------------------------------------------------------


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def bob(make_user):
    return make_user("bob")


@pytest.fixture
def client_for():
    """A Django test client signed in as the user."""
    from django.test import Client

    def make(user) -> Client:
        client = Client()
        client.force_login(user)
        return client

    return make


def sample_results(*, preset: str, after: int, quality: float) -> dict[str, Any]:
    """Results shaped like the worker's (sizes, timings, per-layer errors, an evaluation): the built-in
    model's 210 quantized modules by their real names; recovery in percent, none for top-1 agreement."""
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj")  # fmt: skip
    layers = [f"model.layers.{i}.{name}" for i in range(30) for name in projections]
    return {
        "model": "smollm2-135m-instruct",
        "preset": preset,
        "size_before_bytes": 269_060_096,
        "size_after_bytes": after,
        "compression_ratio": round(269_060_096 / after, 3),
        "timings": {"load_s": 2.1, "compress_s": 31.4, "save_s": 1.2, "hash_s": 0.3},
        "layer_errors": [
            {"module": name, "error": 0.4 + 0.37 * (i % 13) + 0.011 * i + (545.98 if i == 209 else 0.0)}
            for i, name in enumerate(layers)
        ],
        "settings": {
            "device": "cpu",
            "memory_plan": {
                "mode": "sequential",
                "device": "cpu",
                "summary": "the whole model in host memory (1.04 GB of 4.00 GB available)",
                "figures": {
                    "host_ram": {"needed": 1_040_000_000, "available": 4_000_000_000, "capped": True},
                    "disk": {"needed": 333_000_000, "available": 80_000_000_000, "capped": False},
                },
                "offloaded_bytes": 0,
                "host_weights_bytes": 0,
                "capped": ["host_ram"],
            },
        },
        "evaluation": {
            "metrics": [
                {
                    "name": "perplexity",
                    "label": "Perplexity (held-out text)",
                    "baseline": 12.84,
                    "compressed": round(12.84 / quality, 2),
                    "recovery": 100 * quality,
                    "higher_is_better": False,
                },
                {
                    "name": "top1_agreement",
                    "label": "Top-1 token agreement (%)",
                    "baseline": 100.0,
                    "compressed": 100 * quality,
                    "recovery": None,
                    "higher_is_better": True,
                },
            ],
            "generations": [
                {
                    "prompt": "What is the capital of France?",
                    "baseline": "The capital of France is Paris.",
                    "compressed": "The capital of France is Paris, a city on the Seine.",
                }
            ],
        },
    }


@pytest.fixture
def succeeded_job(make_job):
    """A succeeded job with results and a small checkpoint on disk (files, README and a sha256 manifest)."""
    from django.utils import timezone

    from engine.artifacts import write_manifest

    def make(owner, *, preset: str = "fp8-dynamic", after: int = 164_000_000, quality: float = 0.991):
        job = make_job(owner, preset=preset)
        relpath = job.artifacts_relpath()
        folder = current_media_root() / relpath
        shutil.rmtree(folder.parent, ignore_errors=True)  # ids repeat after rolled-back tests
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(os.urandom(50_000))
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "README.md").write_text(
            "---\nbase_model: smollm2-135m-instruct\n---\n# smollm2-135m-instruct-" + preset + "\n\n"
            "## Evaluation\n\n| Metric | Baseline | Compressed | Recovery |\n|---|---|---|---|\n"
            f"| Perplexity | 12.84 | {12.84 / quality:.2f} | {quality * 100:.1f}% |\n\n<script>alert(1)</script>\n"
        )
        manifest = write_manifest(folder)
        now = timezone.now()
        job.status, job.stage, job.percent = "succeeded", "done", 100.0
        job.started_at, job.finished_at = now - timezone.timedelta(seconds=42), now
        job.artifacts_path, job.manifest = relpath, manifest
        job.results = sample_results(preset=preset, after=after, quality=quality)
        job.save()
        # Submitted before it started, as a real one (created_at is set on insert).
        type(job).objects.filter(pk=job.pk).update(created_at=now - timezone.timedelta(seconds=45))
        job.refresh_from_db()
        return job

    return make


# --- the broker and a live worker (browser tests) ---------------------------------------------------------


@pytest.fixture(scope="module")
def live_worker(django_db_setup, broker, tmp_path_factory) -> Iterator[subprocess.Popen]:
    """`celery -A compressor_app worker` as its own process on the test database and this module's queues."""
    from django.db import connection

    name = f"frontend-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    # Local model folders allowed, as an operator may: the two-pass test compresses a tiny model from one
    env = worker_env(
        settings_dict=connection.settings_dict,
        broker=broker,
        media_root=current_media_root(),
        COMPRESSOR_ALLOW_LOCAL_PATHS="True",
    )
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)  # set for the browser's thread only
    process = start_worker_process(name=name, queues=QUEUES, log_path=log_path, env=env)
    process.log_path = log_path  # type: ignore[attr-defined]
    try:
        wait_for_worker(process, name, log_path, timeout=120)
        yield process
    finally:
        stop_worker_process(process)


def worker_log(process) -> str:
    return Path(process.log_path).read_text(errors="replace")[-6000:]


# --- the browser --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium (`make browser` installs it), headless, through Playwright; never a downloaded browser."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"No Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium) first.")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls are still synchronous.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture
def new_page(browser, live_server):
    """new_page() -> a page in a fresh browser context (its own cookies), 1280 px wide."""
    contexts = []

    def make(width: int = 1280, height: int = 900):
        context = browser.new_context(
            viewport={"width": width, "height": height}, accept_downloads=True, base_url=live_server.url
        )
        # Generous: a form post runs preflight, whose first run imports the engine (30 s on a loaded 2-core machine)
        context.set_default_timeout(90_000)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def sign_in():
    def do(page, username: str, password: str = "pw-for-tests", screenshot: str | None = None) -> None:
        page.goto("/accounts/login/")
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(password)
        if screenshot:
            shoot(page, screenshot)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/accounts/login/" not in url)

    return do


def shoot(page, name: str, *, full_page: bool = True) -> Path:
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path
