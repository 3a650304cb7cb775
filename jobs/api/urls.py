from django.urls import include, path
from rest_framework.routers import DefaultRouter

from jobs.api import views

app_name = "api"

# No format suffixes: a checkpoint file path such as model.safetensors must not read as ".safetensors" format.
router = DefaultRouter(use_regex_path=True)
router.include_format_suffixes = False
router.register("jobs", views.JobViewSet, basename="job")
router.register("calibration-datasets", views.CalibrationDatasetViewSet, basename="calibration-dataset")

urlpatterns = [
    path("presets/", views.PresetListView.as_view(), name="preset-list"),
    path("token/", views.TokenView.as_view(), name="token"),
    path("hub-token/", views.HubTokenView.as_view(), name="hub-token"),
    # One checkpoint file by its manifest path, e.g. jobs/7/files/model.safetensors (Range supported).
    path("jobs/<int:pk>/files/<path:path>", views.JobViewSet.as_view({"get": "file"}), name="job-file"),
    path("", include(router.urls)),
]
