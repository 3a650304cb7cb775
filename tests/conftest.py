"""Shared fixtures: the built-in model (converted once into the cached model store) and a tiny model."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.model_sources import builtin_model_dir, default_store


@pytest.fixture(scope="session")
def builtin_model() -> Path:
    """The built-in SmolLM2-135M-Instruct as bf16 safetensors (make test prepares it first)."""
    from engine.cli import prepare_builtin_model

    return prepare_builtin_model()


TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory, builtin_model: Path):
    """make(name, **config): a random-weight Llama (seed 0, bfloat16) of that LlamaConfig, with the built-in
    model's tokenizer, in a new folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(builtin_model)

    def make(name: str, **config) -> Path:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **config)).to(torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(random_llama) -> Path:
    """A tiny random-weight Llama with the built-in model's tokenizer: fast to compress on a CPU."""
    return random_llama("tiny-llama", **TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_model_with_layers(random_llama):
    """make(n): the tiny model's architecture with n decoder layers (random weights), so that a run can be
    stopped in the middle; made once per n."""
    made: dict[int, Path] = {}

    def make(layers: int) -> Path:
        if layers not in made:
            made[layers] = random_llama(f"tiny-llama-{layers}-layers", **{**TINY_LLAMA, "num_hidden_layers": layers})
        return made[layers]

    return make


@pytest.fixture
def tiny_model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model that a test may alter."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def make_user(django_user_model):
    """make_user(username=None, **fields): a user whose password is "pw-for-tests"."""

    def make(username: str | None = None, **fields):
        return django_user_model.objects.create_user(
            username=username or f"user-{uuid.uuid4().hex[:6]}", password="pw-for-tests", **fields
        )

    return make


@pytest.fixture
def make_job():
    """A Job row as the services would leave it (no preflight, nothing queued)."""
    from jobs.models import Job

    def make(owner, **fields) -> Job:
        defaults = {
            "preset": "fp8-dynamic",
            "calibration_kind": "none",
            "queue": "gpu",
            "celery_task_id": str(uuid.uuid4()),
        }
        return Job.objects.create(owner=owner, **{**defaults, **fields})

    return make


@pytest.fixture(scope="session")
def model_store() -> Path:
    return default_store()


@pytest.fixture(scope="session")
def builtin_dir(model_store: Path, builtin_model: Path) -> Path:
    assert builtin_model == builtin_model_dir(model_store)
    return builtin_model


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix, tmp_path_factory) -> None:
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.sqlite3":
        db.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("db") / "test.sqlite3")


@pytest.fixture(scope="session", autouse=True)
def media_root(tmp_path_factory) -> Iterator[Path]:
    from django.test import override_settings

    root = tmp_path_factory.mktemp("media")
    with override_settings(MEDIA_ROOT=root):
        yield root


@pytest.fixture(scope="session", autouse=True)
def broker() -> Iterator[dict[str, str]]:
    """This session's own corner of Redis (a key prefix), shared by every worker the tests start.

    One prefix for the whole session: kombu keeps its connections with the options they were made with,
    so switching prefixes between modules would leave the test process talking to the wrong corner.
    """
    import redis

    from compressor_app.celery import app

    prefix = f"compressor-test-{uuid.uuid4().hex[:10]}:"
    url = app.conf.broker_url
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "global_keyprefix": prefix}
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.exit(f"Redis does not answer at {url}: run scripts/ensure_services.sh first.", returncode=3)
    yield {"url": url, "prefix": prefix}
    for key in client.scan_iter(match=f"{prefix}*", count=500):
        client.delete(key)


@pytest.fixture(autouse=True)
def fresh_shared_cache() -> Iterator[None]:
    """Each test starts with empty throttle counters: this session's cache keys are removed after each test
    (never cache.clear(), which would flush the whole Redis database other sessions share)."""
    yield
    import redis
    from django.conf import settings

    cache = settings.CACHES["default"]
    client = redis.Redis.from_url(cache["LOCATION"])
    for key in client.scan_iter(match=f"{cache['KEY_PREFIX']}:*", count=500):
        client.delete(key)


# --- a hub without the internet -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory) -> Iterator:
    """A local server speaking the hub's HTTP API (tests/hub_server.py), with this session's own hub cache.

    The worker processes the tests start get both as environment (HubServer.env);
    the test process gets them per test through the `hub` fixture.
    """
    from tests.hub_server import HubServer

    server = HubServer(tmp_path_factory.mktemp("hf-hub-cache")).start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server, monkeypatch):
    """The local hub for this test: the engine reads HF_ENDPOINT at each call; huggingface_hub read its cache
    folder and offline mode when it was first imported (maybe by an offline test), so those constants are set."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_server.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return hub_server


@pytest.fixture
def hub_repo_id():
    """A fresh repository name: repositories live as long as the session's hub."""
    return lambda name="model": f"test-org/{name}-{uuid.uuid4().hex[:8]}"
