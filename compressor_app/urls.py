from django.contrib import admin
from django.contrib.auth.views import LoginView
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views.defaults import page_not_found
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from frontend.forms import SignInForm

urlpatterns = [
    path("admin/", admin.site.urls),
    # REST API, its OpenAPI schema and the interactive docs (assets served locally by the sidecar).
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="schema"),
    # Its initialisation script as a file of its own (?script), not inline: the Content-Security-Policy allows none.
    path("api/v1/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="api-docs"),
    path("api/v1/auth/", include("rest_framework.urls", namespace="rest_framework")),
    path("api/v1/", include("jobs.api.urls")),
    # Sign in / sign out (templates in frontend/templates/registration/), then the pages, last.
    path("accounts/login/", LoginView.as_view(authentication_form=SignInForm), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("frontend.urls")),
]


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """An address no route matches: under /api/ in the API's JSON shape (its views answer their own 404s so),
    elsewhere Django's page."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "No such address in the API (see /api/v1/docs/)."}, status=404)
    return page_not_found(request, exception)


handler404 = not_found
