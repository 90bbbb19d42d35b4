"""Top-level URLs: the admin, the REST API under /api/v1/, its OpenAPI schema and Swagger UI, /healthz,
the Prometheus metrics at /metrics and the OpenAI-compatible API under /v1/."""

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from orchestration.admin import metrics_page
from orchestration.api_handler import HealthzApi, PrometheusMetricsApi, unknown_endpoint
from orchestration.openai_api import ChatCompletionsApi, ModelDetailApi, ModelListApi, unknown_url

# The admin app is SimpleAdminConfig (settings.py): every app's admin module is registered here, in the
# processes that serve URLs, and not in Celery workers.
admin.autodiscover()

urlpatterns = [
    path("admin/metrics/", admin.site.admin_view(metrics_page), name="admin-metrics"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("orchestration.urls")),
    # Authenticated like the API (SPECTACULAR_SETTINGS["SERVE_PERMISSIONS"]): a token or an admin session.
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    # After every API route: a JSON 404, whatever DEBUG says; /api itself too (APPEND_SLASH would answer a
    # POST to it with an HTML 500 under DEBUG, an HTML redirect that loses the body without).
    re_path(r"^api(?:/|$)", unknown_endpoint),
    path("healthz", HealthzApi.as_view(), name="healthz"),
    path("metrics", PrometheusMetricsApi.as_view(), name="prometheus-metrics"),
    # The OpenAI-compatible API (orchestration/openai_api.py).
    path("v1/chat/completions", ChatCompletionsApi.as_view(), name="openai-chat-completions"),
    path("v1/models", ModelListApi.as_view(), name="openai-model-list"),
    path("v1/models/<path:model>", ModelDetailApi.as_view(), name="openai-model-detail"),
    re_path(r"^v1(?:/|$)", unknown_url),
]

handler404 = "orchestration.api_handler.not_found"
handler500 = "orchestration.api_handler.internal_error"
