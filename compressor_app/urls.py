from django.contrib import admin
from django.contrib.auth.views import LoginView
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from frontend.forms import SignInForm

urlpatterns = [
    path("admin/", admin.site.urls),
    # REST API, its OpenAPI schema and the interactive docs (assets served locally by the sidecar).
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/v1/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/v1/auth/", include("rest_framework.urls", namespace="rest_framework")),
    path("api/v1/", include("jobs.api.urls")),
    # Sign in / sign out (templates in frontend/templates/registration/), then the pages, last.
    path("accounts/login/", LoginView.as_view(authentication_form=SignInForm), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("frontend.urls")),
]
