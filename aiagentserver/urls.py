"""Top-level URLs: the admin, the REST API under /api/v1/, and /healthz."""

from django.contrib import admin
from django.urls import include, path

from orchestration.api_handler import HealthzApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("orchestration.urls")),
    path("healthz", HealthzApi.as_view(), name="healthz"),
]

handler404 = "orchestration.api_handler.not_found"
