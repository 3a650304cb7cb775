from django.templatetags.static import static
from django.urls import path
from django.views.generic import RedirectView

from frontend import views

app_name = "frontend"

urlpatterns = [
    path("", views.job_list, name="job-list"),
    path("jobs/rows/", views.job_rows, name="job-rows"),
    path("jobs/new/", views.job_new, name="job-new"),
    path("jobs/<int:pk>/", views.job_detail, name="job-detail"),
    path("jobs/<int:pk>/live/", views.job_live, name="job-live"),
    path("jobs/<int:pk>/log.txt", views.job_log, name="job-log"),
    path("jobs/<int:pk>/SHA256SUMS", views.job_checksums, name="job-checksums"),
    path("jobs/<int:pk>/cancel/", views.job_cancel, name="job-cancel"),
    path("jobs/<int:pk>/retry/", views.job_retry, name="job-retry"),
    path("jobs/<int:pk>/delete/", views.job_delete, name="job-delete"),
    path("jobs/<int:pk>/push/", views.job_push, name="job-push"),
    path("hub-token/", views.hub_token, name="hub-token"),
    path("api-token/", views.api_token, name="api-token"),
    path("calibration-files/", views.calibration_files, name="calibration-files"),
    path("compare/", views.compare, name="compare"),
    # Pages without a <link rel="icon"> (the admin, the API docs) ask browsers' default address
    path("favicon.ico", RedirectView.as_view(url=static("frontend/favicon.svg"), permanent=True), name="favicon"),
]
