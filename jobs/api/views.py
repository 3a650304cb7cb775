"""REST API views: thin. Validate with a serializer, read through selectors, act through services."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from engine.presets import PRESETS
from jobs import downloads, hub_push, hub_tokens, logtext, selectors
from jobs.api.exceptions import Conflict
from jobs.api.parsers import JSONParser
from jobs.api.schema import ErrorSerializer
from jobs.api.serializers import (
    CalibrationDatasetSerializer,
    HubPushCreateSerializer,
    HubPushSerializer,
    HubTokenInputSerializer,
    HubTokenSerializer,
    JobCreateSerializer,
    JobLogLineSerializer,
    JobSerializer,
    JobSummarySerializer,
    PresetSerializer,
)
from jobs.models import CalibrationDataset, Job
from jobs.services import lifecycle, storage, submissions, tokens

# The domain's errors (EngineError, JobStateError, RateLimited, ...) are answered by jobs.api.exceptions, for
# every view alike: the views let them pass.


class AnyContentNegotiation(BaseContentNegotiation):
    """Downloads send files whatever the Accept header says (errors still come back as JSON)."""

    def select_parser(self, request, parsers):
        return parsers[0]

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


@extend_schema_view(
    retrieve=extend_schema(
        summary="Read a job",
        description="Its status, progress, request, results and checkpoint manifest (another user's job: 404).",
    )
)
class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Compression jobs. Each user sees their own; staff see all. Others' jobs answer 404."""

    serializer_class = JobSerializer
    queryset = Job.objects.none()  # for the schema (ids are integers); get_queryset picks the user's jobs
    # A job request nests objects (calibration, evaluation, search), which a form-encoded body cannot: DRF would
    # drop a nested field given as text instead of refusing it. JSON only.
    parser_classes = [JSONParser]

    def get_content_negotiator(self):
        if getattr(self, "action", None) == "file":  # routed in urls.py (a file path needs no trailing slash)
            return AnyContentNegotiation()
        return super().get_content_negotiator()

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator: no user, but the id's type
            return Job.objects.none()
        wanted = self.request.query_params.get("status")
        if self.action == "list" and wanted is not None and wanted not in Job.Status.values:  # "" too
            raise ValidationError({"status": [f"Use one of: {', '.join(Job.Status.values)}."]})
        if self.action in ("push", "destroy"):  # one's own jobs only, staff included (as on the job page)
            return selectors.job_list_owned_by(user=self.request.user)
        return selectors.job_list_for_user(user=self.request.user, status=wanted if self.action == "list" else None)

    def get_serializer_class(self):
        # A list shows each job without its recipes, results and manifest: they can be large (the detail has them).
        return JobSummarySerializer if self.action == "list" else JobSerializer

    @extend_schema(
        summary="List your jobs",
        description=(
            "Yours (staff: everyone's), newest first, 25 a page, each without its recipes, results and manifest "
            "(read one job for them)."
        ),
        parameters=[OpenApiParameter("status", str, enum=Job.Status.values, description="Only jobs in this state.")],
    )
    def list(self, request: Request, *args, **kwargs) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(summary="Delete an ended job", responses={204: None, 409: ErrorSerializer})
    def destroy(self, request: Request, *args, **kwargs) -> Response:
        """Delete your ended job with its log and files (their bytes leave your quota); 409 while it is queued or
        running: cancel it first."""
        return super().destroy(request, *args, **kwargs)

    def perform_destroy(self, instance: Job) -> None:
        lifecycle.job_delete(job=instance)

    @extend_schema(
        summary="Submit a job",
        request=JobCreateSerializer,
        responses={201: JobSerializer, 200: JobSerializer},
        description=(
            "Submit a job: a model, and either a `preset` or a custom `recipe_yaml` (exactly one of the two). "
            "Preflight runs first: a job that cannot succeed gets 400 naming the field. "
            "Deduplication: when an identical job of yours already succeeded (same model revision, resolved "
            "recipe, calibration data and evaluation) and `force` is false, no new job is created: the answer "
            "is 200 with that earlier job and `duplicate: true`. A new job answers 201."
        ),
    )
    def create(self, request: Request) -> Response:
        serializer = JobCreateSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        submission = submissions.job_submit(
            owner=request.user, data=serializer.to_job_input(), force=serializer.validated_data["force"]
        )
        context = {"request": request, "duplicate": not submission.created}
        return Response(
            JobSerializer(submission.job, context=context).data,
            status=status.HTTP_201_CREATED if submission.created else status.HTTP_200_OK,
        )

    @extend_schema(
        summary="Cancel a job",
        description="Stops a queued or running job; 409 when it has already ended.",
        request=None,
        responses={200: JobSerializer, 409: ErrorSerializer},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        job = lifecycle.job_cancel(job=self.get_object(), by=request.user)
        return Response(JobSerializer(job, context={"request": request}).data)

    @extend_schema(
        summary="Retry a failed or cancelled job",
        request=None,
        responses={201: JobSerializer, 400: OpenApiTypes.OBJECT, 409: ErrorSerializer},
    )
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        """A new job with the same request, linked to this failed or cancelled one (retry_of, attempt + 1)."""
        job = submissions.job_retry(job=self.get_object())
        return Response(JobSerializer(job, context={"request": request}).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Follow a job's log",
        parameters=[
            OpenApiParameter("after", int, description="Only lines with a larger id (the last id you have)."),
            OpenApiParameter("limit", int, description="At most this many lines (default 500, max 2000)."),
        ],
        responses=inline_serializer(
            "JobLogPage",
            {
                "lines": JobLogLineSerializer(many=True),
                "cursor": serializers.IntegerField(),
                "status": serializers.CharField(),
            },
        ),
    )
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, pk: str | None = None) -> Response:
        """Log lines after a cursor; pass the returned cursor back as `after` to get only new lines."""
        job = self.get_object()
        try:
            after = int(request.query_params.get("after", 0))
            limit = max(1, min(2000, int(request.query_params.get("limit", 500))))
        except ValueError:
            raise ValidationError({"after": ["after and limit must be whole numbers."]}) from None
        lines = selectors.job_log_after(job=job, after=after, limit=limit)
        return Response(
            {
                "lines": JobLogLineSerializer(lines, many=True).data,
                "cursor": lines[-1].id if lines else after,
                "status": job.status,
            }
        )

    @extend_schema(summary="Download a job's whole log", responses={(200, "text/plain"): OpenApiTypes.STR})
    @action(detail=True, methods=["get"], content_negotiation_class=AnyContentNegotiation)
    def log(self, request: Request, pk: str | None = None):
        """The whole log as text/plain (times in UTC, no server paths), as the job page's download."""
        return logtext.log_response(self.get_object())

    @extend_schema(summary="Read a job's results", responses={200: OpenApiTypes.OBJECT, 409: ErrorSerializer})
    @action(detail=True, methods=["get"])
    def results(self, request: Request, pk: str | None = None) -> Response:
        """Sizes, timings, per-layer errors and the evaluation table of a succeeded job."""
        job = self.get_object()
        if job.status != Job.Status.SUCCEEDED:
            raise Conflict(f"Job {job.pk} is {job.status}; results exist once it has succeeded.")
        return Response({"id": job.pk, "results": job.results, "manifest": job.manifest})

    @extend_schema(
        summary="Download the checkpoint as one archive",
        parameters=[OpenApiParameter("kind", str, enum=[*downloads.ARCHIVE_KINDS], description="zip (default) or tar")],
        responses={
            (200, "application/zip"): OpenApiTypes.BINARY,
            (200, "application/x-tar"): OpenApiTypes.BINARY,
            409: ErrorSerializer,
        },
    )
    @action(detail=True, methods=["get"], content_negotiation_class=AnyContentNegotiation)
    def archive(self, request: Request, pk: str | None = None):
        """The whole checkpoint as one archive, streamed while it is built."""
        kind = request.query_params.get("kind", "zip")
        if kind not in downloads.ARCHIVE_KINDS:
            raise ValidationError({"kind": ["Use zip or tar."]})
        return self._download(lambda job: downloads.archive_response(job, kind=kind))

    @extend_schema(
        summary="Download the checkpoint's manifest",
        responses={(200, "application/json"): OpenApiTypes.OBJECT, 409: ErrorSerializer},
    )
    @action(detail=True, methods=["get"], content_negotiation_class=AnyContentNegotiation)
    def manifest(self, request: Request, pk: str | None = None):
        """manifest.json: path, size and sha256 of every checkpoint file."""
        return self._download(downloads.manifest_response)

    @extend_schema(
        summary="Download one checkpoint file",
        responses={
            (200, "application/octet-stream"): OpenApiTypes.BINARY,
            (206, "application/octet-stream"): OpenApiTypes.BINARY,
            409: ErrorSerializer,
            416: OpenApiResponse(description="The range starts past the end; Content-Range gives the size."),
        },
        parameters=[OpenApiParameter("Range", str, OpenApiParameter.HEADER, description="bytes=first-last")],
    )
    def file(self, request: Request, pk: str | None = None, path: str = ""):
        """One checkpoint file by its manifest path; supports `Range: bytes=a-b` (206) for resuming."""
        return self._download(
            lambda job: downloads.file_response(
                job, path=path, range_header=request.headers.get("Range"), if_range=request.headers.get("If-Range")
            )
        )

    @extend_schema(
        summary="Push the checkpoint to a hub",
        request=HubPushCreateSerializer,
        responses={202: HubPushSerializer, 400: OpenApiTypes.OBJECT},
        description=(
            "Push the checkpoint of your succeeded job, with its model card, to a hub repository (made when "
            "missing) with your hub token (PUT /api/v1/hub-token/ first). The push runs on a worker: follow it "
            "in GET .../pushes/. Another user's job answers 404, a job that has not succeeded 400."
        ),
    )
    @action(detail=True, methods=["post"])
    def push(self, request: Request, pk: str | None = None) -> Response:
        job = self.get_object()  # another user's job answers 404 before the body is looked at
        serializer = HubPushCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        push = hub_push.hub_push_request(job=job, by=request.user, **serializer.validated_data)
        return Response(HubPushSerializer(push).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="List a job's hub pushes", responses=HubPushSerializer(many=True))
    @action(detail=True, methods=["get"], pagination_class=None)  # at most 20, newest first: one page
    def pushes(self, request: Request, pk: str | None = None) -> Response:
        """The job's pushes to a hub, newest first, with their status, commit and link or error."""
        pushes = hub_push.hub_pushes_for_job(job=self.get_object())
        return Response(HubPushSerializer(pushes, many=True).data)

    def _download(self, respond):
        job = self.get_object()
        try:
            return respond(job)
        except FileNotFoundError:  # a path the manifest does not list; NotDownloadable is the handler's 409
            raise Http404("No such file in this checkpoint.") from None


class PresetListView(APIView):
    """The compression presets, with what each does."""

    @extend_schema(summary="List the compression presets", responses=PresetSerializer(many=True))
    def get(self, request: Request) -> Response:
        presets = [preset.summary() for preset in PRESETS.values()]
        return Response(PresetSerializer(presets, many=True).data)


class TokenView(APIView):
    """Your API token. POST: a new one (the old key stops working at once). DELETE: revoke it."""

    @extend_schema(
        summary="Create or rotate your API token",
        description="Answers the new key, once; the old key stops working at once. The page /api-token/ does the same.",
        request=None,
        responses=inline_serializer("NewToken", {"token": serializers.CharField()}),
        operation_id="token_rotate",
    )
    def post(self, request: Request) -> Response:
        return Response({"token": tokens.token_rotate(user=request.user)})

    @extend_schema(
        summary="Revoke your API token",
        description="Requests with it are refused from now on.",
        request=None,
        responses={204: None},
        operation_id="token_revoke",
    )
    def delete(self, request: Request) -> Response:
        tokens.token_revoke(user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class HubTokenView(APIView):
    """Your hub token, for pushing checkpoints. Write-only: answers show only its hint ("hf_…abcd")."""

    @extend_schema(
        summary="Read your hub token's hint",
        description='Only its hint ("hf_…abcd"), never the token; 404 when you have none.',
        responses={200: HubTokenSerializer, 404: ErrorSerializer},
        operation_id="hub_token_read",
    )
    def get(self, request: Request) -> Response:
        record = hub_tokens.hub_token_for(owner=request.user)
        if record is None:
            raise Http404("You have no hub token.")
        return Response(HubTokenSerializer(record).data)

    @extend_schema(
        summary="Set your hub token",
        description="Stored encrypted, replacing any earlier one; used by your pushes to a hub.",
        request=HubTokenInputSerializer,
        responses=HubTokenSerializer,
        operation_id="hub_token_set",
    )
    def put(self, request: Request) -> Response:
        serializer = HubTokenInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        record = hub_tokens.hub_token_set(owner=request.user, **serializer.validated_data)
        return Response(HubTokenSerializer(record).data)

    @extend_schema(
        summary="Delete your hub token",
        description="Pushes need a new one from then on.",
        request=None,
        responses={204: None},
        operation_id="hub_token_delete",
    )
    def delete(self, request: Request) -> Response:
        hub_tokens.hub_token_delete(owner=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema_view(
    list=extend_schema(summary="List your calibration files"),
    create=extend_schema(
        summary="Upload a calibration file",
        description='A JSONL file of {"text"} or {"messages"} rows, checked as it streams in (400 says what is '
        "wrong). Name the answer's id as a job's calibration dataset.",
    ),
    retrieve=extend_schema(summary="Read a calibration file's record"),
)
class CalibrationDatasetViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Uploaded calibration files (JSONL of {"text"} or {"messages"} rows); each user sees their own.

    An upload is checked once as it streams in (at most COMPRESSOR_MAX_UPLOAD_ROWS rows); its usable rows are
    stored, and a job naming it is checked against that count.
    """

    serializer_class = CalibrationDatasetSerializer
    parser_classes = [MultiPartParser, FormParser]
    queryset = CalibrationDataset.objects.none()  # for the schema; get_queryset picks the user's files

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator: no user, but the id's type
            return CalibrationDataset.objects.none()
        return selectors.calibration_datasets_for_user(user=self.request.user)

    def perform_create(self, serializer: CalibrationDatasetSerializer) -> None:
        serializer.instance = storage.calibration_dataset_create(
            owner=self.request.user,
            name=serializer.validated_data.get("name", ""),
            upload=serializer.validated_data["file"],
        )

    @extend_schema(summary="Delete a calibration file", responses={204: None, 409: ErrorSerializer})
    def destroy(self, request: Request, *args, **kwargs) -> Response:
        """Delete your upload and its file (its bytes leave your quota); 409 while a queued or running job uses it.
        Jobs that ended keep their record without it."""
        return super().destroy(request, *args, **kwargs)

    def perform_destroy(self, instance: CalibrationDataset) -> None:
        storage.calibration_dataset_delete(dataset=instance)
