"""A local server that speaks the Hugging Face hub's HTTP API for the calls the project makes (HF_ENDPOINT).

What huggingface_hub (1.x) asks of it, read from its source:
- HfApi.model_info(files_metadata=True): GET /api/models/{repo}[/revision/{rev}]?blobs=true -> JSON with
  the commit "sha" and "siblings" (rfilename, size, blobId, lfs).
- hf_hub_download and file_exists: HEAD /{repo}/resolve/{rev}/{file} -> X-Repo-Commit, ETag (X-Linked-Etag
  and X-Linked-Size for large files), Content-Length; then GET of the same URL, with Range when resuming.
- get_safetensors_metadata: HEAD as above, then GET with "Range: bytes=0-100000" (206, Content-Range).
- Errors as the hub words them: X-Error-Code RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo.

Pushes, as HfApi.create_repo and upload_folder send them (the LFS path: HF_HUB_DISABLE_XET=1, this server
does not speak Xet), each with "Authorization: Bearer <token>" of a user the test added (add_user):
- POST /api/repos/create {name, organization, visibility} -> {"url"}; 401 for an unknown token, 403 for another
  user's namespace, 409 when it exists (create_repo(exist_ok=True) then reads /api/models/{repo}).
- POST /api/validate-yaml (the card's front matter) -> {"errors": [], "warnings": []}.
- POST /api/models/{repo}/preupload/{rev} {files: [{path, sample, size}]} -> uploadMode "lfs" for binary or
  large files, else "regular"; 403 unless the token's user owns the repository.
- POST /{repo}.git/info/lfs/objects/batch -> an upload href (a one-time URL, no Authorization, like S3's) and
  a verify href per object not stored yet; PUT of the bytes there (sha256 and size checked); POST verify.
- POST /api/models/{repo}/commit/{rev} (NDJSON: header, file with base64 content, lfsFile by oid,
  deletedFile) -> {"commitOid", "commitUrl"}: a new commit on the branch, served by the GET endpoints above.
A private repository is found only with its owner's token (404 RepoNotFound otherwise, as on the hub).

Repositories are made by the tests: from a model folder, or from files given as bytes or generated on the
fly (a synthetic safetensors file of a 1 B model whose header is real and whose data are zeros). A branch
can be moved to a new commit, as a push to the hub would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
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
    owner: str | None = None  # the user whose token may push to it (None: made by a test, nobody may)
    private: bool = False
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
        self.tokens: dict[str, str] = {}  # accepted Bearer tokens -> the user each one is
        self.lfs_objects: dict[str, Blob] = {}  # LFS uploads by sha256, shared by every repository
        self._uploads: dict[str, tuple[str, int]] = {}  # one-time upload id -> (sha256, size) announced
        self._lock = threading.Lock()
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
        the node's model cache that the session's workers share); uploads take huggingface_hub's LFS path (this
        server does not speak Xet)."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_CACHE": str(self.cache),
            "HF_HUB_DISABLE_XET": "1",
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

    def add_user(self, name: str) -> str:
        """A user of this hub; returns the token (hf_...) it accepts for them."""
        token = f"hf_{secrets.token_urlsafe(27)}"
        self.tokens[token] = name
        return token


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

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?/?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_PREUPLOAD = re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")
_LFS_BATCH = re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")
_LFS_VERIFY = re.compile(rf"^/{_REPO}\.git/info/lfs/objects/verify$")
_LFS_UPLOAD = re.compile(r"^/lfs-upload/(?P<upload>[\w-]+)$")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_BAD_TOKEN = "Invalid credentials in Authorization header"  # the hub's words (huggingface_hub reads them)


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


def _is_lfs(sample: bytes, size: int) -> bool:
    """As the hub decides for a repository without .gitattributes rules: binary or large files go to LFS."""
    return size > _LARGE or b"\0" in sample


def _handler_for(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects of the hub
        # Headers and body go out in separate writes: without this, Nagle's algorithm and the client's delayed
        # ACK hold each answer back 40 ms.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self._answer(self._read, body=True)

        def do_HEAD(self) -> None:
            self._answer(self._read, body=False)

        def do_POST(self) -> None:
            self._answer(self._write, body=True)

        def do_PUT(self) -> None:
            self._answer(self._write, body=True)

        def log_message(self, *args) -> None:  # quiet: the tests read server.requests instead
            pass

        def _answer(self, handle: Callable[[str, bool], None], *, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            server.requests.append((self.command, path))
            # The request's body is read before any refusal: left unread, it would garble the next request
            # on this kept-alive connection.
            self.request_body = self._read_body() if self.command in ("POST", "PUT") else b""
            try:
                handle(path, body)
            except _Refusal as refusal:
                headers = {"X-Error-Code": refusal.code, "X-Error-Message": refusal.message}
                if refusal.commit:
                    headers["X-Repo-Commit"] = refusal.commit
                self._send(refusal.status, json.dumps({"error": refusal.message}).encode(), headers, body)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline().strip():  # trailers, then the blank line
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _json(self) -> dict:
            try:
                return json.loads(self.request_body or b"{}")
            except ValueError:
                raise _Refusal(400, "", "The body is not JSON") from None

        # --- who asks ---

        def _user(self) -> str | None:
            """The user of the Bearer token, None without one; 401 for a token this hub does not know."""
            scheme, _, token = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            if token not in server.tokens:
                raise _Refusal(401, "", _BAD_TOKEN)
            return server.tokens[token]

        def _signed_in(self) -> str:
            user = self._user()
            if user is None:
                raise _Refusal(401, "", _BAD_TOKEN)
            return user

        def _writable(self, repo_id: str) -> Repo:
            """The repository, if the token's user may push to it."""
            user = self._signed_in()
            repo = self._visible(repo_id, user)
            if repo.owner != user:
                raise _Refusal(403, "", f"You don't have the rights to write to {repo_id}")
            return repo

        def _visible(self, repo_id: str, user: str | None) -> Repo:
            repo = server.repos.get(repo_id)
            if repo is None or (repo.private and repo.owner != user):
                raise _Refusal(404, "RepoNotFound", "Repository not found")
            return repo

        # --- reads ---

        def _read(self, path: str, body: bool) -> None:
            if match := _API.match(path):
                self._model_info(match["repo"], match["rev"] or "main", body)
            elif match := _RESOLVE.match(path):
                self._file(match["repo"], match["rev"], match["file"], body)
            else:
                raise _Refusal(404, "", "Not found")

        def _repo(self, repo_id: str, revision: str) -> tuple[Repo, str]:
            repo = self._visible(repo_id, self._user())
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
                "private": repo.private,
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

        # --- pushes ---

        def _write(self, path: str, body: bool) -> None:
            routes = [
                (_PREUPLOAD, self._preupload),
                (_COMMIT, self._commit),
                (_LFS_BATCH, self._lfs_batch),
                (_LFS_VERIFY, self._lfs_verify),
                (_LFS_UPLOAD, self._lfs_upload),
            ]
            if path == "/api/repos/create":
                return self._create_repo()
            if path == "/api/validate-yaml":
                return self._send_json(200, {"errors": [], "warnings": []})
            for pattern, handle in routes:
                if match := pattern.match(path):
                    return handle(**match.groupdict())
            raise _Refusal(404, "", "Not found")

        def _create_repo(self) -> None:
            user, wanted = self._signed_in(), self._json()
            namespace = wanted.get("organization") or user
            repo_id = f"{namespace}/{wanted.get('name')}"
            if namespace != user:
                raise _Refusal(403, "", f"You don't have the rights to create a model under the namespace {namespace}")
            with server._lock:
                if repo_id in server.repos:
                    raise _Refusal(409, "", "You already created this model repo")
                repo = Repo(repo_id, owner=user, private=wanted.get("visibility") == "private")
                repo.commit({})
                server.repos[repo_id] = repo
            self._send_json(200, {"url": f"{server.endpoint}/{repo_id}", "name": repo_id})

        def _preupload(self, repo: str, rev: str) -> None:
            self._writable(repo)
            files = [
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if _is_lfs(base64.b64decode(item["sample"]), item["size"]) else "regular",
                    "shouldIgnore": False,
                }
                for item in self._json().get("files", [])
            ]
            self._send_json(200, {"files": files, "commitOid": server.repos[repo].resolve(rev)})

        def _lfs_batch(self, repo: str) -> None:
            self._writable(repo)
            objects = []
            for item in self._json().get("objects", []):
                oid, size = item["oid"], int(item["size"])
                answer = {"oid": oid, "size": size, "authenticated": True}
                if oid not in server.lfs_objects:  # a stored object needs no upload: no actions
                    upload = uuid.uuid4().hex
                    server._uploads[upload] = (oid, size)
                    verify = f"{server.endpoint}/{repo}.git/info/lfs/objects/verify"
                    answer["actions"] = {
                        "upload": {"href": f"{server.endpoint}/lfs-upload/{upload}"},
                        "verify": {"href": verify},
                    }
                objects.append(answer)
            self._send_json(200, {"transfer": "basic", "objects": objects})

        def _lfs_upload(self, upload: str) -> None:
            oid, size = server._uploads.pop(upload, (None, None))
            if oid is None:
                raise _Refusal(403, "", "This upload URL is unknown or was used already")
            data = self.request_body
            if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
                raise _Refusal(400, "", f"The uploaded bytes do not match the announced object {oid}")
            server.lfs_objects[oid] = Blob(len(data), lambda start, end: data[start:end], oid)
            self._send(200, b"", {}, body=True)

        def _lfs_verify(self, repo: str) -> None:
            self._writable(repo)
            wanted = self._json()
            blob = server.lfs_objects.get(wanted.get("oid"))
            if blob is None or blob.size != wanted.get("size"):
                raise _Refusal(404, "", f"Object {wanted.get('oid')} was not uploaded")
            self._send_json(200, {"success": True})

        def _commit(self, repo: str, rev: str) -> None:
            target = self._writable(repo)
            lines = [json.loads(line) for line in self.request_body.splitlines() if line.strip()]
            files = dict(target.commits[target.resolve(rev)]) if target.resolve(rev) else {}
            for line in lines:
                value = line.get("value", {})
                if line.get("key") == "file":
                    files[value["path"]] = Blob.of_bytes(base64.b64decode(value["content"]))
                elif line.get("key") == "lfsFile":
                    if value["oid"] not in server.lfs_objects:
                        raise _Refusal(400, "", f"LFS object {value['oid']} of {value['path']} was not uploaded")
                    files[value["path"]] = server.lfs_objects[value["oid"]]
                elif line.get("key") == "deletedFile":
                    files.pop(value["path"], None)
            with server._lock:
                sha = target.commit(files, branch=rev)
            self._send_json(200, {"commitOid": sha, "commitUrl": f"{server.endpoint}/{repo}/commit/{sha}"})

        # --- answers ---

        def _send_json(self, status: int, data: dict) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"}, body=True)

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
