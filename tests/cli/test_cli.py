"""`compressor` (compressor_cli) as a real process against a live server: submit and follow a real job, download
and verify checkpoints, and the one-line messages for refusals, a missing token and an unreachable server."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from jobs.models import Job
from tests.cli.conftest import files_of
from tests.support import REPO, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

FILES = {
    "model.safetensors": bytes(range(256)) * 3000,
    "config.json": b'{"model_type": "llama"}',
    "sub/tokenizer.json": b"[1, 2, 3]",
}


@pytest.fixture
def done_job(cli_user, make_job, checkpoint):
    """A succeeded job of the CLI's user with a small checkpoint (files and a sha256 manifest) on disk."""
    job = make_job(cli_user)
    folder = checkpoint(job, FILES)
    return job, folder


@pytest.fixture
def requests_to() -> Iterator[Callable[[str], list[str]]]:
    """requests_to(path): a list that grows by one as the live server (a thread of this process) starts each
    request for path."""
    from django.core.signals import request_started

    receivers = []

    def watch(path: str) -> list[str]:
        seen: list[str] = []

        def receiver(sender, environ=None, **kwargs) -> None:
            if environ and environ.get("PATH_INFO") == path:
                seen.append(environ["REQUEST_METHOD"])

        request_started.connect(receiver, weak=False)
        receivers.append(receiver)
        return seen

    yield watch
    for receiver in receivers:
        request_started.disconnect(receiver)


def test_logs_follow_a_running_job_whose_log_loses_its_head_printing_each_line_once(
    compressor, cli_user, make_job, settings, requests_to
):
    # Given a running job whose server keeps only its newest 4 log lines
    from jobs.services.job_log import job_log_append

    settings.COMPRESSOR_JOB_LOG_MAX_LINES = 4
    job = make_job(cli_user, status="running")
    job_log_append(job_id=job.pk, lines=[("preparing", "line 0")])

    # When its log is followed while lines arrive, until the job ends
    log_reads = requests_to(f"/api/v1/jobs/{job.pk}/log/")
    follower = compressor.start("logs", str(job.pk), "--follow", "--interval", "0.1")
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(follower.stdout), daemon=True)
    reader.start()
    for number in range(1, 13):  # each line once the one before is out (lines the server drops unseen are lost)
        last = f"line {number - 1}\n"
        wait_until(lambda last=last: last in "".join(printed), timeout=60, what=f"the follower to print {last!r}")
        if number < 12:
            job_log_append(job_id=job.pk, lines=[("compressing", f"line {number}")])
    # Two more reads of the unchanged log while the job still runs: nothing may be printed twice
    reads = len(log_reads)
    wait_until(lambda: len(log_reads) >= reads + 2, timeout=60, what="the follower to read the log twice more")
    Job.objects.filter(pk=job.pk).update(status="succeeded")
    follower.wait(timeout=60)
    reader.join(timeout=10)
    out, err = "".join(printed), follower.stderr.read()

    # Then every line was printed once, in order, although the server dropped the oldest ones meanwhile
    assert follower.returncode == 0, err
    texts = [line.split("] ", 1)[1] for line in out.splitlines()[1:]]
    assert texts == [f"line {number}" for number in range(12)], out
    assert out.startswith(f"# Log of job {job.pk}") and job.log_lines.count() == 4


def test_status_follows_a_running_job_to_its_failure_and_exits_1_with_the_error(compressor, cli_user, make_job):
    # Given a running job
    job = make_job(cli_user, status="running", stage="compressing", message="Layer 1 of 4", percent=25.0)

    # When it is followed while it moves on and then fails
    follower = compressor.start("status", str(job.pk), "--follow", "--interval", "0.1", "--progress", "always")
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: follower.stderr.read(1), "")), daemon=True)
    reader.start()
    wait_until(lambda: "Layer 1 of 4" in "".join(seen), timeout=60, what="the bar to show the first message")
    Job.objects.filter(pk=job.pk).update(message="Layer 3 of 4", percent=75.0)
    wait_until(lambda: "Layer 3 of 4" in "".join(seen), timeout=60, what="the bar to show the second message")
    Job.objects.filter(pk=job.pk).update(status="failed", error="The GPU ran out of memory\nat layer 3.")
    follower.wait(timeout=60)
    reader.join(timeout=10)
    out, err = follower.stdout.read(), "".join(seen)

    # Then the bar showed the stage and message as they came, and the exit status says it failed, with why
    assert follower.returncode == 1, out + err
    assert "compressing: Layer 1 of 4" in err and "25%" in err and "compressing: Layer 3 of 4" in err and "75%" in err
    assert f"Job {job.pk} failed: The GPU ran out of memory at layer 3." in err


def test_a_checkpoint_downloads_as_files_and_as_archives_matching_the_manifest(compressor, done_job, tmp_path):
    job, _folder = done_job

    files = compressor("download", str(job.pk), "--out", "files")
    again = compressor("download", str(job.pk), "--out", "files")  # what is already there and intact is kept
    zipped = compressor("download", str(job.pk), "--out", "zip", "--archive", "zip")
    tarred = compressor("download", str(job.pk), "--out", "tar", "--archive", "tar")

    log = compressor("logs", str(job.pk))
    assert log.code == 0 and log.out == f"# Log of job {job.pk} (fp8-dynamic on smollm2-135m-instruct); times in UTC\n"
    for run in (files, again, zipped, tarred):
        assert run.code == 0, run.err
        assert f"Job {job.pk}: 3 files" in run.out and "every sha256 matches the manifest" in run.out
    got = files_of(tmp_path / "files")
    assert {k: v for k, v in got.items() if k != "manifest.json"} == FILES
    assert b'"sha256"' in got["manifest.json"]
    assert [p.suffix for p in (tmp_path / "zip").glob("job-*")] == [".zip"]
    assert [p.suffix for p in (tmp_path / "tar").glob("job-*")] == [".tar"]


def test_a_partial_download_is_resumed_and_a_bad_partial_one_is_named_and_dropped(compressor, done_job, tmp_path):
    # Given a download interrupted half-way (a .part file with the first half of the weights)
    job, _folder = done_job
    weights = FILES["model.safetensors"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.part").write_bytes(weights[: len(weights) // 2])

    # When it is run again, the rest is asked for with Range and the whole file matches
    resumed = compressor("download", str(job.pk), "--out", "out")
    assert resumed.code == 0, resumed.err
    assert (out / "model.safetensors").read_bytes() == weights and not (out / "model.safetensors.part").exists()

    # Given a partial file whose first bytes are wrong (a disk error, another file of the same name)
    (out / "model.safetensors").unlink()
    (out / "model.safetensors.part").write_bytes(b"\0" * 1000)

    # Then the resumed file does not match: it is named, not kept, and the next run fetches it whole
    bad = compressor("download", str(job.pk), "--out", "out")
    assert bad.code == 1 and "MISMATCH model.safetensors: sha256" in bad.err, bad.err
    assert not (out / "model.safetensors").exists() and not (out / "model.safetensors.part").exists()
    assert compressor("download", str(job.pk), "--out", "out").code == 0
    assert (out / "model.safetensors").read_bytes() == weights


def test_a_manifest_naming_a_path_outside_the_folder_writes_nothing(compressor, done_job, tmp_path):
    # Given a manifest.json (as served) that names a file above the download folder
    job, folder = done_job
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"].append({"path": "../escaped.txt", "size": 1, "sha256": "0" * 64})
    (folder / "manifest.json").write_text(json.dumps(manifest))

    run = compressor("download", str(job.pk), "--out", "out")

    assert run.code == 1 and "The manifest names an unsafe path '../escaped.txt'" in run.err, run.err
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()


def test_a_file_damaged_on_the_server_is_refused_by_it_and_named(compressor, done_job, tmp_path):
    # Given a stored file that no longer matches the manifest (the server checks before it sends)
    job, folder = done_job
    (folder / "model.safetensors").write_bytes(b"x" * len(FILES["model.safetensors"]))

    run = compressor("download", str(job.pk))

    assert run.code != 0 and "Traceback" not in run.err
    assert "model.safetensors" in run.err and "damaged" in run.err and "409" in run.err


@pytest.mark.parametrize("archive", [None, "zip"])
def test_bytes_that_arrive_different_from_the_manifest_fail_the_download_naming_the_file(
    compressor, done_job, tmp_path, monkeypatch, archive
):
    # Given a server that sends a changed file without noticing (its own check is switched off here)
    from jobs import downloads

    monkeypatch.setattr(downloads, "ensure_intact", lambda *args, **kwargs: None)
    job, folder = done_job
    (folder / "sub" / "tokenizer.json").write_bytes(b"[9, 9, 9]")

    # When it is downloaded
    run = compressor("download", str(job.pk), "--out", "out", *(["--archive", archive] if archive else []))

    # Then the command fails naming the file, and no file that failed is left under its name
    assert run.code == 1, run.out + run.err
    assert "MISMATCH sub/tokenizer.json" in run.err and "do not match the manifest: sub/tokenizer.json" in run.err
    assert "Traceback" not in run.err and "every sha256 matches" not in run.out
    if archive is None:
        assert not (tmp_path / "out" / "sub" / "tokenizer.json").exists()
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_refused_submission_is_one_line_naming_the_field(compressor, builtin_model, tmp_path):
    (tmp_path / "recipe.yaml").write_text("stage: !!python/object/apply:os.system ['true']\n")

    unknown = compressor("submit", "smollm2-135m-instruct", "--preset", "no-such-preset")
    too_high = compressor("submit", "smollm2-135m-instruct", "--preset", "fp8-dynamic", "--priority", "99")
    nested = compressor("submit", "smollm2-135m-instruct", "--preset", "fp8-dynamic", "--samples", "0")
    recipe = compressor("submit", "smollm2-135m-instruct", "--recipe", "recipe.yaml")

    cases = ((unknown, "preset"), (too_high, "priority"), (nested, "calibration.samples"), (recipe, "recipe_yaml"))
    for run, field in cases:
        assert run.code == 3, run.err
        assert run.err.startswith(f"compressor: Refused (400): {field}: ") and run.err.count("\n") == 1, run.err
    assert "no-such-preset" in unknown.err
    assert not Job.objects.exists()


def test_a_quota_refusal_is_a_429_with_its_reason(compressor, cli_user, make_job, settings, builtin_model):
    settings.COMPRESSOR_USER_MAX_ACTIVE_JOBS = 1
    make_job(cli_user)  # queued: the one active job allowed

    run = compressor("submit", "smollm2-135m-instruct", "--preset", "fp8-dynamic", "--calibration", "none")

    assert run.code == 3 and run.err.startswith("compressor: Refused (429): "), run.err
    assert Job.objects.count() == 1


def test_no_token_a_wrong_token_and_no_server_are_one_line_messages(compressor, free_port):
    missing = compressor("status", "1", env={"COMPRESSOR_TOKEN_FILE": None})
    unreadable = compressor("status", "1", "--token-file", "/no/such/token")
    wrong = compressor("status", "1", env={"COMPRESSOR_TOKEN_FILE": None, "COMPRESSOR_TOKEN": "not-a-token"})
    refused = compressor("status", "1", "--server", f"http://127.0.0.1:{free_port}")

    assert missing.code == 2 and "No API token: give --token-file FILE" in missing.err
    assert unreadable.code == 2 and "Cannot read the token file /no/such/token" in unreadable.err
    assert wrong.code == 3 and "The server refused the token (401): Invalid token." in wrong.err
    assert refused.code == 3 and f"Cannot connect to http://127.0.0.1:{free_port}/api/v1/: connection refused" in (
        refused.err
    )
    for run in (missing, unreadable, wrong, refused):
        assert run.err.count("\n") == 1 and "Traceback" not in run.err, run.err


def test_a_queued_job_is_cancelled_and_a_second_cancel_is_refused(compressor, cli_user, make_job, make_user):
    job = make_job(cli_user)
    others = make_job(make_user("dave"))

    cancelled = compressor("cancel", str(job.pk))
    again = compressor("cancel", str(job.pk))
    status = compressor("status", str(job.pk))
    not_mine = compressor("cancel", str(others.pk))

    assert cancelled.code == 0 and f"Job {job.pk} cancelled." in cancelled.out, cancelled.err
    assert Job.objects.get(pk=job.pk).status == "cancelled"
    assert again.code == 3 and "Refused (409): " in again.err and "already cancelled" in again.err
    assert status.code == 1 and f"Job {job.pk} cancelled" in status.err
    assert not_mine.code == 3 and f"Refused (404): there is no job {others.pk} of yours" in not_mine.err
    assert Job.objects.get(pk=others.pk).status == "queued"


def test_the_client_imports_neither_django_nor_torch():
    code = "import sys, compressor_cli.main; print(sorted({m.split('.')[0] for m in sys.modules} & FORBIDDEN))"
    code = code.replace("FORBIDDEN", "{'django', 'torch', 'engine', 'jobs', 'rest_framework'}")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_submission_with_an_uploaded_calibration_file_is_recorded_then_cancelled(compressor, builtin_model, tmp_path):
    # Given a JSONL calibration file on the user's machine
    rows = (f'{{"text": "The quick brown fox jumps over the lazy dog, time {i}."}}\n' for i in range(16))
    (tmp_path / "cal.jsonl").write_text("".join(rows))

    # When a GPTQ job is submitted with it (the file is uploaded first), then cancelled before it starts
    run = compressor(
        "submit", "smollm2-135m-instruct", "--preset", "int8-w8a8-gptq", "--calibration-file", "cal.jsonl",
        "--samples", "8", "--max-seq-len", "64", "--priority", "3", "-q",
    )  # fmt: skip
    assert run.code == 0, run.err
    job = Job.objects.get(pk=int(run.out))
    cancel = compressor("cancel", run.out.strip())

    # Then the job was recorded with the uploaded file and the options given, and is cancelled
    assert "Uploaded cal.jsonl as calibration dataset" in run.err and "(16 rows)" in run.err
    assert job.calibration_kind == "upload" and job.calibration_file.rows == 16
    assert (job.calibration_samples, job.calibration_max_seq_len, job.priority) == (8, 64, 3)
    assert cancel.code == 0 and Job.objects.get(pk=job.pk).status == "cancelled"


# Last in the module: its worker (module-scoped) starts here, after the tests that leave queued messages.
@pytest.mark.slow
def test_a_submitted_job_is_followed_to_success_then_downloaded_and_verified(
    cli_worker, compressor, hub, hub_repo_id, tiny_model_dir, tmp_path
):
    # Given a tiny model on the (local) hub
    repo_id = hub_repo_id("cli-tiny")
    hub.add_folder(repo_id, tiny_model_dir)

    # When it is submitted with --follow
    run = compressor(
        "submit", repo_id, "--preset", "fp8-dynamic", "--calibration", "none", "--follow",
        "--interval", "0.5", "--progress", "always", timeout=900,
    )  # fmt: skip

    # Then the command waited for the real worker to finish the job, with a progress bar, and exited 0
    assert run.code == 0, run.out + run.err + "\n" + cli_worker.log_tail()
    job_id = int(re.search(r"Submitted job (\d+)", run.out).group(1))
    assert f"Job {job_id} succeeded" in run.out and "100%" in run.err
    job = Job.objects.get(pk=job_id)
    assert job.status == "succeeded" and job.calibration_kind == "none"

    # When its checkpoint is downloaded
    download = compressor("download", str(job_id), "--out", "checkpoint", "--progress", "always")

    # Then every file is there with the manifest's sha256, and the manifest beside them
    assert download.code == 0, download.err
    assert "every sha256 matches the manifest" in download.out
    got = files_of(tmp_path / "checkpoint")
    assert {e["path"]: e["sha256"] for e in job.manifest["files"]} == {
        path: hashlib.sha256(data).hexdigest() for path, data in got.items() if path != "manifest.json"
    }
    assert any(path.endswith(".safetensors") for path in got)

    # ...and status and logs say what happened
    status = compressor("status", str(job_id))
    assert status.code == 0 and f"Job {job_id} succeeded" in status.out
    logs = compressor("logs", str(job_id), "--follow", "--interval", "0.2")
    assert logs.code == 0 and logs.out.startswith(f"# Log of job {job_id}") and "Started on" in logs.out
