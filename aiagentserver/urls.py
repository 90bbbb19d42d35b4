"""Top-level URLs: the admin, the REST API under /api/v1/, its OpenAPI schema and Swagger UI, and /healthz."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from orchestration.api_handler import HealthzApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("orchestration.urls")),
    # Authenticated like the API (SPECTACULAR_SETTINGS["SERVE_PERMISSIONS"]): a token or an admin session.
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("healthz", HealthzApi.as_view(), name="healthz"),
]

handler404 = "orchestration.api_handler.not_found"
