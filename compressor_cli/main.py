"""compressor submit | status | logs | download | cancel: the service's REST API (/api/v1/) from a terminal.

The server comes from --server or COMPRESSOR_URL; the API token from --token-file, COMPRESSOR_TOKEN or
COMPRESSOR_TOKEN_FILE (never from the command line, where other users of the machine could read it).

Exit status: 0 done (a followed job succeeded, a download matched its manifest); 1 the job failed or was
cancelled, or a downloaded file does not match the manifest; 2 a usage or configuration error (no token) or
a local file that cannot be written; 3 the server refused the request, failed or could not be reached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import requests
from tqdm import tqdm

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")
CHUNK_BYTES = 1024 * 1024
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 120
# While following, a server that stops answering for a moment (a restart) is asked again this many times.
FOLLOW_RETRIES = 5

EXIT_OK, EXIT_JOB, EXIT_USAGE, EXIT_API = 0, 1, 2, 3


class CliError(Exception):
    """A failure the user gets as one line on stderr, with an exit status (never a traceback)."""

    def __init__(self, message: str, *, code: int = EXIT_API, transient: bool = False) -> None:
        super().__init__(message)
        # transient: the server could not be reached or answered 502-504 (a restart): worth asking again
        self.message, self.code, self.transient = message, code, transient


# --- configuration -----------------------------------------------------------------------------------------


def read_token(token_file: str | None, environ: dict[str, str]) -> str:
    """The API token: --token-file, else COMPRESSOR_TOKEN, else the file COMPRESSOR_TOKEN_FILE names."""
    if not token_file and environ.get("COMPRESSOR_TOKEN", "").strip():
        return environ["COMPRESSOR_TOKEN"].strip()
    path = token_file or environ.get("COMPRESSOR_TOKEN_FILE", "").strip()
    if not path:
        raise CliError(
            "No API token: give --token-file FILE, or set COMPRESSOR_TOKEN or COMPRESSOR_TOKEN_FILE "
            "(make one with `manage.py drf_create_token USER` or POST /api/v1/token/).",
            code=EXIT_USAGE,
        )
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise CliError(f"Cannot read the token file {path}: {exc.strerror or exc}.", code=EXIT_USAGE) from None
    if not token:
        raise CliError(f"The token file {path} is empty.", code=EXIT_USAGE)
    return token


def api_root(server: str | None, environ: dict[str, str]) -> str:
    """The API's root URL, from a server address given with or without /api/v1."""
    url = (server or environ.get("COMPRESSOR_URL") or DEFAULT_SERVER).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CliError(f"The server address '{url}' must start with http:// or https://.", code=EXIT_USAGE)
    if url.endswith("/api/v1"):
        url = url[: -len("/api/v1")]
    return url + "/api/v1/"


# --- the API -------------------------------------------------------------------------------------------------


def describe_refusal(response: requests.Response) -> str:
    """An error answer as one line: DRF's {"detail"} or its field errors ("calibration.samples: ...")."""
    try:
        body = response.json()
    except ValueError:
        body = None
    reasons: list[str] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{where}.{key}" if where else str(key))
        elif isinstance(value, list):
            for inner in value:
                walk(inner, where)
        else:
            text = " ".join(str(value).split())
            reasons.append(text if where in ("", "detail", "non_field_errors") else f"{where}: {text}")

    if isinstance(body, dict | list):
        walk(body, "")
    reason = "; ".join(reasons) or (response.reason or "no reason given")
    status = response.status_code
    if status == 401:
        return f"The server refused the token (401): {reason}"
    if status == 429:
        wait = response.headers.get("Retry-After")
        return f"Refused (429): {reason}" + (f" (try again in {wait} s)" if wait and "in " not in reason else "")
    if status >= 500:
        return f"The server failed ({status}): {reason}"
    return f"Refused ({status}): {reason}"


class Api:
    """The REST API with a token; every failure becomes a CliError with one line."""

    def __init__(self, root: str, token: str) -> None:
        self.root = root
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Token {token}", "Accept": "application/json"})
        self.session.headers["User-Agent"] = "compressor-cli/1"

    def url(self, path: str) -> str:
        return self.root + path.lstrip("/")

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        try:
            response = self.session.request(method, self.url(path), **kwargs)
        except requests.ConnectionError as exc:
            raise CliError(f"Cannot connect to {self.root}: {_connection_reason(exc)}.", transient=True) from None
        except requests.Timeout:
            raise CliError(f"The server at {self.root} did not answer in time.", transient=True) from None
        except requests.RequestException as exc:
            raise CliError(f"The request to {self.root} failed: {exc}.") from None
        if response.status_code not in ok:
            message = describe_refusal(response)
            job = re.match(r"jobs/(\d+)/", path)
            if response.status_code == 404 and job:  # DRF says "No Job matches the given query."
                message = f"Refused (404): there is no job {job.group(1)} of yours on {self.root}"
            response.close()
            raise CliError(message, transient=response.status_code in (502, 503, 504))
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise CliError(f"The server's answer to {path} is not JSON; is {self.root} this service?") from None

    def job(self, job_id: int) -> dict:
        return self.json("GET", f"jobs/{job_id}/")

    def patiently(self, call: Callable[[], Any]) -> Any:
        """call(), asked again while the server is unreachable for a moment (following a long job)."""
        for attempt in range(FOLLOW_RETRIES):
            try:
                return call()
            except CliError as exc:
                if not exc.transient or attempt == FOLLOW_RETRIES - 1:
                    raise
                time.sleep(2**attempt)
        raise AssertionError("unreachable")


def _connection_reason(exc: requests.ConnectionError) -> str:
    text = str(exc)
    for known in ("Connection refused", "Name or service not known", "No route to host", "timed out"):
        if known in text:
            return known.lower()
    return "the connection failed"


# --- submit, status, cancel ---------------------------------------------------------------------------------


def submission_body(args: argparse.Namespace) -> dict:
    """The JSON of POST /jobs/ (jobs/api/serializers.py JobCreateSerializer): only what was given, so the
    server's defaults hold for the rest."""
    body: dict[str, Any] = {"model": args.model}
    if args.recipe:
        try:
            body["recipe_yaml"] = Path(args.recipe).read_text()
        except OSError as exc:
            raise CliError(f"Cannot read the recipe {args.recipe}: {exc.strerror or exc}.", code=EXIT_USAGE) from None
    else:
        body["preset"] = args.preset
    for option in ("revision", "priority", "device_class"):
        if getattr(args, option) is not None:
            body[option] = getattr(args, option)
    if args.ignore_indivisible:
        body["ignore_indivisible"] = True
    if args.force:
        body["force"] = True
    calibration = {
        "kind": args.calibration,
        "dataset_id": args.calibration_dataset,
        "hub_dataset": args.hub_dataset,
        "split": args.split,
        "column": args.column,
        "samples": args.samples,
        "max_seq_len": args.max_seq_len,
    }
    calibration = {key: value for key, value in calibration.items() if value is not None}
    if calibration.get("dataset_id") is not None:
        calibration.setdefault("kind", "upload")
    if calibration:
        body["calibration"] = calibration
    evaluation = {
        "offline": False if args.no_offline else None,
        "tasks": args.task or None,
        "limit": args.eval_limit,
        "backend": args.eval_backend,
    }
    evaluation = {key: value for key, value in evaluation.items() if value is not None}
    if args.evaluate or evaluation:
        body["evaluation"] = evaluation
    return body


def upload_calibration(api: Api, path: str) -> int:
    """Upload a JSONL calibration file; its id on the server."""
    try:
        handle = Path(path).open("rb")
    except OSError as exc:
        raise CliError(f"Cannot read {path}: {exc.strerror or exc}.", code=EXIT_USAGE) from None
    with handle:
        files = {"file": (Path(path).name, handle, "application/jsonl")}
        dataset = api.json("POST", "calibration-datasets/", ok=(201,), files=files, data={"name": Path(path).stem})
    print(f"Uploaded {path} as calibration dataset {dataset['id']} ({dataset.get('rows')} rows).", file=sys.stderr)
    return int(dataset["id"])


def cmd_submit(api: Api, args: argparse.Namespace) -> int:
    if args.calibration_file:
        args.calibration_dataset = upload_calibration(api, args.calibration_file)
    body = submission_body(args)
    job = api.json("POST", "jobs/", ok=(200, 201), json=body)
    if args.quiet:
        print(job["id"])
    elif job.get("duplicate"):
        print(f"Job {job['id']} already succeeded with the same request; it is the answer (--force runs it again).")
    else:
        where = f", position {job['queue_position']} in the queue" if job.get("queue_position") else ""
        print(f"Submitted job {job['id']}: {job['status']}{where}. {_page(api, job)}")
    if args.follow:
        return follow_status(api, int(job["id"]), interval=args.interval, progress=args.progress)
    return EXIT_OK


def _page(api: Api, job: dict) -> str:
    page = (job.get("links") or {}).get("page")
    return api.root.removesuffix("/api/v1/") + page if page else ""


def _describe(job: dict) -> str:
    if job["status"] == "queued":
        position = job.get("queue_position")
        return "queued" + (f" (position {position})" if position else "")
    parts = [part for part in (job.get("stage"), job.get("message")) if part]
    return ": ".join(parts) or job["status"]


def _outcome(job: dict) -> int:
    """Print how a job ended; the exit status for it."""
    if job["status"] == "succeeded":
        duration = f" in {job['duration_s']:.0f} s" if job.get("duration_s") is not None else ""
        print(f"Job {job['id']} succeeded{duration}.")
        return EXIT_OK
    error = " ".join((job.get("error") or job.get("message") or "").split())
    print(f"Job {job['id']} {job['status']}" + (f": {error}" if error else "."), file=sys.stderr)
    return EXIT_JOB


def follow_status(api: Api, job_id: int, *, interval: float, progress: str) -> int:
    """A bar of the job's percent, described by its stage and message, until it ends."""
    job = api.job(job_id)
    bar_format = "{desc} |{bar}| {n:.0f}% [{elapsed}]"
    with _bar(progress, total=100, bar_format=bar_format, desc=f"job {job_id} {_describe(job)}"[:100]) as bar:
        while True:
            bar.set_description_str(f"job {job_id} {_describe(job)}"[:100], refresh=False)
            bar.n = float(job.get("percent") or 0)
            bar.refresh()
            if job["status"] in TERMINAL:
                break
            time.sleep(interval)
            job = api.patiently(lambda: api.job(job_id))
    return _outcome(job)


def cmd_status(api: Api, args: argparse.Namespace) -> int:
    if args.follow:
        return follow_status(api, args.job, interval=args.interval, progress=args.progress)
    job = api.job(args.job)
    if args.json:
        print(json.dumps(job, indent=2))
    elif job["status"] in TERMINAL:
        return _outcome(job)
    else:
        print(f"Job {job['id']} {job['status']}, {float(job.get('percent') or 0):.0f}%: {_describe(job)}")
    return EXIT_JOB if job["status"] in ("failed", "cancelled") else EXIT_OK


def cmd_cancel(api: Api, args: argparse.Namespace) -> int:
    job = api.json("POST", f"jobs/{args.job}/cancel/")
    print(f"Job {job['id']} {job['status']}.")
    return EXIT_OK


# --- push to a hub -------------------------------------------------------------------------------------------

PUSH_ENDED = ("succeeded", "failed")


def cmd_push(api: Api, args: argparse.Namespace) -> int:
    """Queue a push of the job's checkpoint and card with the hub token stored on the server (never given here)."""
    body = {"repo_id": args.repo, "private": not args.public}
    push = api.json("POST", f"jobs/{args.job}/push/", json=body, ok=(202,))
    print(f"Push {push['id']} of job {args.job} to {push['repo_id']} is queued.")
    if not args.follow:
        return EXIT_OK
    while push["status"] not in PUSH_ENDED:
        time.sleep(args.interval)
        pushes = api.patiently(lambda: api.json("GET", f"jobs/{args.job}/pushes/"))
        push = next((item for item in pushes if item["id"] == push["id"]), push)
    if push["status"] == "succeeded":
        print(f"Pushed to {push['repo_id']}: {push['commit_url']}")
        return EXIT_OK
    print(f"Push to {push['repo_id']} failed: {' '.join(push['error'].split())}", file=sys.stderr)
    return EXIT_JOB


# --- logs ----------------------------------------------------------------------------------------------------


def _log_text(api: Api, job_id: int) -> str:
    """The whole log from GET jobs/<id>/log/ (text/plain, times in UTC, no server paths)."""
    response = api.request("GET", f"jobs/{job_id}/log/", headers={"Accept": "text/plain"})
    response.encoding = response.encoding or "utf-8"
    return response.text


def cmd_logs(api: Api, args: argparse.Namespace) -> int:
    if not args.follow:  # streamed as it comes, byte for byte
        response = api.request("GET", f"jobs/{args.job}/log/", headers={"Accept": "text/plain"}, stream=True)
        with response:
            for chunk in response.iter_content(64 * 1024):
                sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        return EXIT_OK
    seen: list[str] = []
    while True:
        # The status is read before the log, so the log read after a terminal status holds the last lines.
        status = api.patiently(lambda: api.job(args.job))["status"]
        lines = api.patiently(lambda: _log_text(api, args.job)).split("\n")[:-1]  # the log ends with a newline
        for line in lines[_new_from(seen, lines) :]:
            print(line, flush=True)
        seen = lines or seen
        if status in TERMINAL:
            return EXIT_OK
        time.sleep(args.interval)


def _new_from(seen: list[str], lines: list[str]) -> int:
    """Where the lines not printed yet begin. The server keeps only a job's newest lines
    (COMPRESSOR_JOB_LOG_MAX_LINES), so a long log loses its head: then the last line printed is looked for."""
    if not seen:
        return 0
    if len(lines) >= len(seen) and lines[len(seen) - 1] == seen[-1]:
        return len(seen)
    if seen[-1] in lines:
        return len(lines) - lines[::-1].index(seen[-1])
    return 0


# --- download and verify -------------------------------------------------------------------------------------


def safe_path(name: str) -> PurePosixPath:
    """A manifest path as a relative path inside the output folder (a hostile server cannot write elsewhere)."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name.startswith("~"):
        raise CliError(f"The manifest names an unsafe path '{name}'; nothing written there.", code=EXIT_JOB)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def cmd_download(api: Api, args: argparse.Namespace) -> int:
    manifest_response = api.request("GET", f"jobs/{args.job}/manifest/")
    try:
        manifest = manifest_response.json()
        entries = [(safe_path(e["path"]), int(e["size"]), str(e["sha256"])) for e in manifest["files"]]
    except (ValueError, KeyError, TypeError):
        raise CliError(f"The manifest of job {args.job} is not readable.") from None
    out = Path(args.out or f"job-{args.job}")
    out.mkdir(parents=True, exist_ok=True)
    total = sum(size for _path, size, _sha in entries)
    if args.archive:
        mismatched = _download_archive(api, args, out, entries, total)
    else:
        mismatched = _download_files(api, args, out, entries, total)
    if mismatched:
        for line in mismatched:
            print(f"MISMATCH {line}", file=sys.stderr)
        names = ", ".join(line.split(":")[0] for line in mismatched)
        print(f"Job {args.job}: {len(mismatched)} file(s) do not match the manifest: {names}.", file=sys.stderr)
        return EXIT_JOB
    (out / "manifest.json").write_bytes(manifest_response.content)
    print(f"Job {args.job}: {len(entries)} files, {total:,} bytes, every sha256 matches the manifest: {out}")
    return EXIT_OK


def _download_files(api: Api, args: argparse.Namespace, out: Path, entries, total: int) -> list[str]:
    """Each file through jobs/<id>/files/<path>, hashed as it arrives; a .part is resumed with Range.
    A file already there with the manifest's sha256 is kept. Returns the mismatches ("path: why")."""
    mismatched = []
    with _bar(args.progress, total=total, unit="B", unit_scale=True, unit_divisor=1024) as bar:
        for path, size, expected in entries:
            target = out / path
            bar.set_description_str(str(path)[-40:])
            if target.is_file() and target.stat().st_size == size and sha256_of(target) == expected:
                bar.update(size)
                continue
            got = _fetch_file(api, args.job, path, target, expected, bar)
            if got != expected:
                mismatched.append(f"{path}: sha256 {got} (the manifest says {expected})")
    return mismatched


def _fetch_file(api: Api, job_id: int, path: PurePosixPath, target: Path, expected: str, bar: tqdm) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    have = partial.stat().st_size if partial.is_file() else 0
    headers = {"Accept": "*/*"}
    if have:
        headers |= {"Range": f"bytes={have}-", "If-Range": f'"{expected}"'}
    response = api.request("GET", f"jobs/{job_id}/files/{path}", ok=(200, 206, 416), stream=True, headers=headers)
    with response:
        if response.status_code == 206:  # the server sends the rest; what is here counts
            with partial.open("rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    digest.update(chunk)
            bar.update(have)
            mode = "ab"
        else:  # 200: the whole file (a 416 means the part is not of this file: start again)
            if response.status_code == 416:
                response.close()
                partial.unlink()
                return _fetch_file(api, job_id, path, target, expected, bar)
            mode = "wb"
        with partial.open(mode) as handle:
            for chunk in response.iter_content(CHUNK_BYTES):
                handle.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    got = digest.hexdigest()
    if got == expected:
        partial.replace(target)
    else:
        partial.unlink()  # never left under the file's name, and never resumed from
    return got


def _download_archive(api: Api, args: argparse.Namespace, out: Path, entries, total: int) -> list[str]:
    """The streamed archive (zip or tar) saved in out, then every member's sha256 checked against the manifest."""
    response = api.request(
        "GET", f"jobs/{args.job}/archive/", params={"kind": args.archive}, stream=True, headers={"Accept": "*/*"}
    )
    disposition = response.headers.get("Content-Disposition", "")
    name = disposition.split("filename=")[-1].strip('"; ') if "filename=" in disposition else ""
    name = Path(name).name or f"job-{args.job}.{args.archive}"
    target = out / name
    length = int(response.headers.get("Content-Length") or 0) or total
    with response, target.open("wb") as handle:
        with _bar(args.progress, total=length, unit="B", unit_scale=True, unit_divisor=1024, desc=name) as bar:
            for chunk in response.iter_content(CHUNK_BYTES):
                handle.write(chunk)
                bar.update(len(chunk))
    hashes = _archive_hashes(target, args.archive)
    mismatched = []
    for path, _size, expected in entries:
        got = hashes.get(str(path))
        if got != expected:
            mismatched.append(f"{path}: " + (f"sha256 {got} (the manifest says {expected})" if got else "missing"))
    print(f"Saved {target}", file=sys.stderr)
    return mismatched


def _archive_hashes(path: Path, kind: str) -> dict[str, str]:
    """sha256 of each member, by its path below the archive's top folder."""

    def hashed(handle) -> str:
        digest = hashlib.sha256()
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
        return digest.hexdigest()

    def inner(name: str) -> str:
        return PurePosixPath(*PurePosixPath(name).parts[1:]).as_posix()

    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as archive:
                return {inner(n): hashed(archive.open(n)) for n in archive.namelist() if not n.endswith("/")}
        with tarfile.open(path) as archive:
            return {inner(m.name): hashed(archive.extractfile(m)) for m in archive.getmembers() if m.isfile()}
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise CliError(f"The archive {path} is damaged: {exc}.", code=EXIT_JOB) from None


# --- the command line ----------------------------------------------------------------------------------------


def _bar(progress: str, **kwargs: Any) -> tqdm:
    disable = {"always": False, "never": True}.get(progress)  # auto: shown on a terminal only
    return tqdm(file=sys.stderr, disable=disable, dynamic_ncols=True, leave=True, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", help=f"the service's address (COMPRESSOR_URL; default {DEFAULT_SERVER})")
    common.add_argument("--token-file", help="the API token's file (else COMPRESSOR_TOKEN, COMPRESSOR_TOKEN_FILE)")
    common.add_argument(
        "--progress", choices=["auto", "always", "never"], default="auto", help="progress bars (auto: on a terminal)"
    )
    common.add_argument("--interval", type=float, default=2.0, help="seconds between polls when following (2)")

    parser = argparse.ArgumentParser(
        prog="compressor",
        description="Submit, follow, download, cancel and push compression jobs through the service's REST API.",
        epilog="Exit status: 0 ok; 1 the job failed or was cancelled, or a download does not match its manifest; "
        "2 usage, configuration or a local file; 3 the server refused, failed or could not be reached.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", parents=[common], help="submit a job")
    submit.add_argument("model", help="the built-in model's name or a hub id (namespace/name)")
    recipe = submit.add_mutually_exclusive_group(required=True)
    recipe.add_argument("--preset", help="a preset's name (GET /api/v1/presets/ lists them)")
    recipe.add_argument("--recipe", metavar="FILE", help="a custom llm-compressor recipe (YAML) instead of a preset")
    submit.add_argument("--revision", help="a hub branch, tag or commit")
    calibration = submit.add_argument_group("calibration")
    calibration.add_argument("--calibration", metavar="KIND", help="builtin, none, upload or hub")
    calibration.add_argument("--calibration-file", metavar="FILE", help="upload this JSONL file and calibrate on it")
    calibration.add_argument("--calibration-dataset", type=int, metavar="ID", help="an uploaded calibration file's id")
    calibration.add_argument("--hub-dataset", metavar="ID", help="a hub dataset (kind hub)")
    calibration.add_argument("--split", help="the hub dataset's split (train)")
    calibration.add_argument("--column", help="the hub dataset's text column (text)")
    calibration.add_argument("--samples", type=int, help="calibration samples (32)")
    calibration.add_argument("--max-seq-len", type=int, help="tokens per sample (256)")
    evaluation = submit.add_argument_group("evaluation (none unless one of these is given)")
    evaluation.add_argument("--evaluate", action="store_true", help="evaluate with the server's defaults")
    evaluation.add_argument("--no-offline", action="store_true", help="without the offline suite (perplexity)")
    evaluation.add_argument("--task", action="append", metavar="NAME", help="an lm-eval task (repeatable)")
    evaluation.add_argument("--eval-limit", type=int, metavar="N", help="at most N examples per task")
    evaluation.add_argument("--eval-backend", metavar="NAME", help="hf or vllm")
    submit.add_argument("--priority", type=int, help="0-9, 9 first")
    submit.add_argument("--device-class", help="gpu or cpu")
    submit.add_argument("--ignore-indivisible", action="store_true", help="skip layers the scheme cannot divide")
    submit.add_argument("--force", action="store_true", help="run even if an identical job already succeeded")
    submit.add_argument("--follow", action="store_true", help="follow the job to its end (exit 1 if it fails)")
    submit.add_argument("-q", "--quiet", action="store_true", help="print only the job's id")
    submit.set_defaults(handler=cmd_submit)

    status = commands.add_parser("status", parents=[common], help="a job's status")
    status.add_argument("job", type=int)
    status.add_argument("--follow", action="store_true", help="a progress bar until the job ends")
    status.add_argument("--json", action="store_true", help="the whole job as JSON")
    status.set_defaults(handler=cmd_status)

    logs = commands.add_parser("logs", parents=[common], help="a job's whole log")
    logs.add_argument("job", type=int)
    logs.add_argument("--follow", action="store_true", help="print new lines until the job ends")
    logs.set_defaults(handler=cmd_logs)

    download = commands.add_parser("download", parents=[common], help="download a checkpoint and verify it")
    download.add_argument("job", type=int)
    download.add_argument("--out", metavar="DIR", help="the folder to write (job-<id>)")
    download.add_argument("--archive", choices=["zip", "tar"], help="one archive instead of the files")
    download.set_defaults(handler=cmd_download)

    push = commands.add_parser(
        "push", parents=[common], help="push a succeeded job's checkpoint and card to a hub (your stored hub token)"
    )
    push.add_argument("job", type=int)
    push.add_argument("repo", help="the hub repository, namespace/name (made when missing)")
    push.add_argument("--public", action="store_true", help="make a new repository public (default: private)")
    push.add_argument("--follow", action="store_true", help="wait for the push to end (exit 1 if it fails)")
    push.set_defaults(handler=cmd_push)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job", type=int)
    cancel.set_defaults(handler=cmd_cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        api = Api(api_root(args.server, os.environ), read_token(args.token_file, os.environ))
        return args.handler(api, args)
    except CliError as exc:
        print(f"compressor: {exc.message}", file=sys.stderr)
        return exc.code
    except requests.RequestException as exc:  # the connection broke while a body streamed in
        print(f"compressor: The connection to the server broke: {type(exc).__name__}; run it again.", file=sys.stderr)
        return EXIT_API
    except OSError as exc:  # writing the download: a full disk, a folder not writable
        print(f"compressor: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("compressor: interrupted (the job itself goes on; `compressor cancel` stops it).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
