"""A local server that speaks the Hugging Face hub's HTTP API for the calls the project makes (HF_ENDPOINT).

What huggingface_hub (1.x) asks of it, read from its source:
- HfApi.model_info(files_metadata=True): GET /api/models/{repo}[/revision/{rev}]?blobs=true -> JSON with
  the commit "sha" and "siblings" (rfilename, size, blobId, lfs).
- hf_hub_download and file_exists: HEAD /{repo}/resolve/{rev}/{file} -> X-Repo-Commit, ETag (X-Linked-Etag
  and X-Linked-Size for large files), Content-Length; then GET of the same URL, with Range when resuming.
- get_safetensors_metadata: HEAD as above, then GET with "Range: bytes=0-100000" (206, Content-Range).
- Errors as the hub words them: X-Error-Code RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo.

Repositories are made by the tests: from a model folder, or from files given as bytes or generated on the
fly (a synthetic safetensors file of a 1 B model whose header is real and whose data are zeros). A branch
can be moved to a new commit, as a push to the hub would.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_LARGE = 10 * 2**20  # files above this are "LFS" files on the hub: they carry X-Linked-* headers


@dataclass(frozen=True)
class Blob:
    """One file's content: its size and a reader of byte ranges (a file on disk, bytes, or generated)."""

    size: int
    read: Callable[[int, int], bytes]  # (start, end exclusive) -> bytes
    etag: str

    @classmethod
    def of_bytes(cls, data: bytes) -> Blob:
        return cls(len(data), lambda start, end: data[start:end], hashlib.sha256(data).hexdigest())

    @classmethod
    def of_file(cls, path: Path) -> Blob:
        stat = path.stat()

        def read(start: int, end: int) -> bytes:
            with path.open("rb") as handle:
                handle.seek(start)
                return handle.read(end - start)

        # Named by path, size and mtime: hashing a large file's content would cost seconds for nothing.
        etag = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        return cls(stat.st_size, read, etag)


@dataclass
class Repo:
    repo_id: str
    gated: bool = False
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, Blob], *, branch: str = "main") -> str:
        """A new commit holding exactly `files`; the branch moves to it. Returns its sha."""
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.branches.get(revision)


class HubServer:
    """The server and its repositories; runs on a thread of the test process."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache  # the hub cache folder of the processes that use this server
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of each request, for tests to read
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment that points a new process (a worker) at this server and its caches (the hub's, and
        the node's model cache that the session's workers share)."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_CACHE": str(self.cache),
            "COMPRESSOR_MODEL_CACHE_DIR": str(self.cache / "compressor-model-cache"),
        }

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add_repo(self, repo_id: str, files: dict[str, Blob], *, gated: bool = False) -> Repo:
        repo = Repo(repo_id, gated=gated)
        repo.commit(files)
        self.repos[repo_id] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, *, gated: bool = False) -> Repo:
        """A repository whose main branch holds the files of a model folder."""
        return self.add_repo(repo_id, folder_blobs(folder), gated=gated)


def folder_blobs(folder: Path) -> dict[str, Blob]:
    return {path.name: Blob.of_file(path) for path in sorted(Path(folder).iterdir()) if path.is_file()}


# --- a 1 B model of a real architecture: Llama-3.2-1B's config, a real header, zeros for data -------------

LLAMA_3_2_1B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def llama_shapes(config: dict) -> dict[str, list[int]]:
    """The weight shapes of a LlamaForCausalLM with this config, as its safetensors file names them."""
    hidden, inner, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": [config["vocab_size"], hidden], "model.norm.weight": [hidden]}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        shapes |= {
            f"{prefix}.self_attn.q_proj.weight": [heads * head_dim, hidden],
            f"{prefix}.self_attn.k_proj.weight": [kv, hidden],
            f"{prefix}.self_attn.v_proj.weight": [kv, hidden],
            f"{prefix}.self_attn.o_proj.weight": [hidden, heads * head_dim],
            f"{prefix}.mlp.gate_proj.weight": [inner, hidden],
            f"{prefix}.mlp.up_proj.weight": [inner, hidden],
            f"{prefix}.mlp.down_proj.weight": [hidden, inner],
            f"{prefix}.input_layernorm.weight": [hidden],
            f"{prefix}.post_attention_layernorm.weight": [hidden],
        }
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = [config["vocab_size"], hidden]
    return shapes


def synthetic_safetensors(shapes: dict[str, list[int]], dtype: str = "BF16", itemsize: int = 2) -> Blob:
    """A safetensors file with a real header for these shapes; its data (zeros) is made as it is read."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    prefix = len(encoded).to_bytes(8, "little") + encoded
    total = len(prefix) + offset

    def read(start: int, end: int) -> bytes:
        head = prefix[start:end] if start < len(prefix) else b""
        return head + bytes(max(0, end - max(start, len(prefix))))

    return Blob(total, read, hashlib.sha256(prefix).hexdigest())


def llama_1b_files() -> dict[str, Blob]:
    return {
        "config.json": Blob.of_bytes(json.dumps(LLAMA_3_2_1B_CONFIG, indent=2).encode()),
        "model.safetensors": synthetic_safetensors(llama_shapes(LLAMA_3_2_1B_CONFIG)),
    }


# --- the HTTP side --------------------------------------------------------------------------------------

_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?/?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


def _handler_for(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects of the hub
        # Headers and body go out in separate writes: without this, Nagle's algorithm and the client's delayed
        # ACK hold each answer back 40 ms.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def log_message(self, *args) -> None:  # quiet: the tests read server.requests instead
            pass

        def _answer(self, *, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            server.requests.append((self.command, path))
            try:
                if match := _API.match(path):
                    self._model_info(match["repo"], match["rev"] or "main", body)
                elif match := _RESOLVE.match(path):
                    self._file(match["repo"], match["rev"], match["file"], body)
                else:
                    raise _Refusal(404, "", "Not found")
            except _Refusal as refusal:
                headers = {"X-Error-Code": refusal.code, "X-Error-Message": refusal.message}
                if refusal.commit:
                    headers["X-Repo-Commit"] = refusal.commit
                self._send(refusal.status, json.dumps({"error": refusal.message}).encode(), headers, body)

        def _repo(self, repo_id: str, revision: str) -> tuple[Repo, str]:
            repo = server.repos.get(repo_id)
            if repo is None:
                raise _Refusal(404, "RepoNotFound", "Repository not found")
            commit = repo.resolve(revision)
            if commit is None:
                raise _Refusal(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo, commit

        def _model_info(self, repo_id: str, revision: str, body: bool) -> None:
            repo, commit = self._repo(repo_id, revision)
            siblings = [
                {"rfilename": name, "size": blob.size, "blobId": blob.etag[:40]}
                | ({"lfs": {"sha256": blob.etag, "size": blob.size, "pointerSize": 134}} if blob.size > _LARGE else {})
                for name, blob in sorted(repo.commits[commit].items())
            ]
            info = {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "library_name": "transformers",
                "tags": ["transformers", "safetensors"],
                "siblings": siblings,
            }
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

        def _file(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
            repo, commit = self._repo(repo_id, revision)
            if repo.gated:
                message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                raise _Refusal(401, "GatedRepo", message)
            blob = repo.commits[commit].get(filename)
            if blob is None:
                raise _Refusal(404, "EntryNotFound", f"{filename} does not exist", commit=commit)
            etag = f'"{blob.etag}"'
            headers = {"X-Repo-Commit": commit, "ETag": etag, "Accept-Ranges": "bytes"}
            if blob.size > _LARGE:
                headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(blob.size)}
            start, end, status = 0, blob.size, 200
            if (wanted := _RANGE.fullmatch(self.headers.get("Range", ""))) and (wanted[1] or wanted[2]):
                start = int(wanted[1]) if wanted[1] else max(0, blob.size - int(wanted[2]))
                end = min(blob.size, int(wanted[2]) + 1) if wanted[1] and wanted[2] else blob.size
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
            self._send_stream(status, blob, start, end, headers, body)

        def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _send_stream(self, status: int, blob: Blob, start: int, end: int, headers: dict, body: bool) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if not body:
                return
            for chunk_start in range(start, end, 2**20):
                self.wfile.write(blob.read(chunk_start, min(end, chunk_start + 2**20)))

    return Handler
