"""The OpenAPI schema (/api/schema/) and Swagger UI (/api/docs/): complete, valid, true to the answers.

Every URL of the server is in the schema with its methods (a new endpoint without ``extend_schema``
fails here), the schema generates without a warning, real answers match the documented bodies, and
the docs page needs the same credentials as the API and loads its files from this server.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import Any

import pytest
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.generators import SchemaGenerator
from jsonschema import Draft202012Validator
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db

# URL prefixes that are not this API's endpoints. A new endpoint goes in the schema, not here. The
# OpenAI-compatible API (v1/) follows OpenAI's own specification (doc/api_endpoints.md).
NOT_IN_SCHEMA = ("admin/", "api/schema/", "api/docs/", "v1/", "^v1", "^api")  # ^api, ^v1: the JSON 404s for the rest
# Routes that serve a documented endpoint under another spelling: GET /api/v1/tasks is /api/v1/tasks/.
ALIASES = {"api/v1/tasks"}
ERROR_REF = "#/components/schemas/Error"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return SchemaGenerator().get_schema(request=None, public=True)


def _endpoints(patterns: list, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (route, callback) of the URLconf, with the route written as an OpenAPI path."""
    found = []
    for pattern in patterns:
        route = prefix + str(pattern.pattern)
        if route.startswith(NOT_IN_SCHEMA) or route in ALIASES:
            continue
        if isinstance(pattern, URLResolver):
            found.extend(_endpoints(pattern.url_patterns, route))
        elif isinstance(pattern, URLPattern):
            found.append(("/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route), pattern.callback))
    return found


def _methods(callback: Any) -> set[str]:
    view = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
    assert view is not None, f"{callback} is not a class-based view: the schema cannot describe it"
    return {method for method in view.http_method_names if method not in ("head", "options") and hasattr(view, method)}


def test_the_schema_generates_valid_and_without_a_warning(tmp_path):
    # --fail-on-warn fails on anything drf-spectacular had to guess; --validate checks OpenAPI 3.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))


def test_every_endpoint_is_in_the_schema_with_its_methods(schema):
    endpoints = _endpoints(get_resolver().url_patterns)
    assert {"/api/v1/{profile}/{role}", "/api/v1/tasks/{task_id}", "/healthz"} <= {path for path, _ in endpoints}
    for path, callback in endpoints:
        assert path in schema["paths"], f"{path} is not in the OpenAPI schema: make it a DRF view with extend_schema"
        assert set(schema["paths"][path]) == _methods(callback), path


def test_every_operation_is_named_described_and_lists_its_errors(schema):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            assert operation.get("operationId") and operation.get("summary") and operation.get("tags"), where
            responses = operation["responses"]
            assert any(code.startswith("2") for code in responses), where
            for code, response in responses.items():
                assert response.get("description"), f"{where} {code}"
                if code.startswith("2") or code == "304":  # a 304 has no body
                    continue
                assert "application/json" in response.get("content", {}), f"{where} {code}"
                if path != "/healthz":  # its 503 is the health report itself
                    assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, f"{where} {code}"
            if {} not in operation.get("security", []):
                assert "401" in responses, f"{where} needs a token: document its 401"
            for name in re.findall(r"{(\w+)}", path):
                parameter = next(p for p in operation["parameters"] if p["in"] == "path" and p["name"] == name)
                if name == "task_id":
                    assert parameter["schema"] == {"type": "string", "format": "uuid"}, where


def test_the_task_list_documents_its_filters_and_pages(schema):
    parameters = {p["name"]: p for p in schema["paths"]["/api/v1/tasks/"]["get"]["parameters"]}
    assert set(parameters) == {"status", "profile", "role", "page", "page_size"}
    assert all(p["in"] == "query" for p in parameters.values())
    assert "awaiting_feedback" in parameters["status"]["schema"]["enum"]


def test_the_task_packet_and_its_history_event_are_components(schema):
    components = schema["components"]["schemas"]
    packet = components["TaskPacket"]["properties"]
    assert packet["history"]["items"] == {"$ref": "#/components/schemas/HistoryEvent"}
    assert packet["payload"]["type"] == "object"
    assert "GET /api/v1/config" in packet["payload"]["description"]
    assert set(components["HistoryEvent"]["properties"]) == {"at", "event", "agent", "status", "llm", "detail"}
    assert set(components["Error"]["required"]) == {"code", "detail"}


def test_the_token_scheme_names_the_header(schema):
    token = schema["components"]["securitySchemes"]["tokenAuth"]
    assert (token["type"], token["in"], token["name"]) == ("apiKey", "header", "Authorization")
    assert "Token <key>" in token["description"]


# --- The answers are as documented --------------------------------------------------------------


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 to JSON Schema: ``nullable`` becomes a null alternative, and an object with declared
    properties admits no other key, so that a key the answers have and the schema lacks is caught."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _json_schema(value) for key, value in node.items()}
    if "properties" in node and "additionalProperties" not in node:
        node["additionalProperties"] = False
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


class Documented:
    """Checks an answer against the schema of its path, method and status code."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.components = _json_schema(copy.deepcopy(schema["components"]))

    def check(self, path: str, method: str, response: Any) -> dict[str, Any]:
        responses = self.schema["paths"][path][method]["responses"]
        code = str(response.status_code)
        assert code in responses, f"{method.upper()} {path} answered {code}, which its schema does not list"
        body = json.loads(response.content)
        documented = _json_schema(responses[code]["content"]["application/json"]["schema"])
        Draft202012Validator({**documented, "components": self.components}).validate(body)
        return body


@pytest.fixture
def documented(schema) -> Documented:
    return Documented(schema)


def _post(client: APIClient, url: str, body: dict[str, Any]) -> Any:
    return client.post(url, data=json.dumps(body), content_type="application/json")


def test_task_answers_match_the_schema(api, documented):
    submit = "/api/v1/{profile}/{role}"
    packet = documented.check(submit, "post", _post(api, "/api/v1/developer/planner", {"payload": {"input": "x"}}))
    again = {"task_id": packet["task_id"], "payload": {"input": "x"}}
    documented.check(submit, "post", _post(api, "/api/v1/developer/planner", again))
    conflict = _post(api, "/api/v1/developer/planner", {"task_id": packet["task_id"], "payload": {"input": "y"}})
    assert documented.check(submit, "post", conflict)["task_id"] == packet["task_id"]
    assert "valid_profiles" in documented.check(submit, "post", _post(api, "/api/v1/nope/planner", {}))
    assert documented.check(submit, "post", _post(api, "/api/v1/developer/planner", {}))["field"] == "payload"

    detail = "/api/v1/tasks/{task_id}"
    assert documented.check(detail, "get", api.get(f"/api/v1/tasks/{packet['task_id']}")) == packet
    documented.check(detail, "get", api.get("/api/v1/tasks/not-a-uuid"))
    documented.check(detail, "get", api.get(f"/api/v1/tasks/{uuid.uuid4()}"))

    feedback = "/api/v1/tasks/{task_id}/feedback"
    response = _post(api, f"/api/v1/tasks/{packet['task_id']}/feedback", {"feedback": "no"})
    assert documented.check(feedback, "post", response)["code"] == "no_feedback_loop"

    cancel = "/api/v1/tasks/{task_id}/cancel"
    assert documented.check(cancel, "post", api.post(f"/api/v1/tasks/{packet['task_id']}/cancel"))["version"] == 2
    documented.check(cancel, "post", api.post(f"/api/v1/tasks/{packet['task_id']}/cancel"))

    listed = documented.check("/api/v1/tasks/", "get", api.get("/api/v1/tasks/", {"page_size": 1}))
    assert listed["results"][0]["task_id"] == packet["task_id"]
    documented.check("/api/v1/tasks/", "get", api.get("/api/v1/tasks/", {"status": "bogus"}))
    documented.check("/api/v1/tasks/", "get", api.get("/api/v1/tasks/", {"page": 99}))
    documented.check("/api/v1/tasks/", "get", APIClient().get("/api/v1/tasks/"))


def test_configuration_and_health_answers_match_the_schema(api, documented):
    config = documented.check("/api/v1/config", "get", api.get("/api/v1/config"))
    assert config["profiles"]["developer"]["roles"]["planner"]["queue"] == "developer.planner"
    assert documented.check("/api/v1/llms", "get", api.get("/api/v1/llms"))["results"]
    assert documented.check("/healthz", "get", APIClient().get("/healthz"))["status"] == "ok"


def test_the_api_root_lists_endpoints_that_answer(api, documented):
    """`make run` prints /api/v1/, which was a 404."""
    root = documented.check("/api/v1/", "get", api.get("/api/v1/"))
    assert root["submit"] == "http://testserver/api/v1/{profile}/{role}"
    assert root["task"] == "http://testserver/api/v1/tasks/{task_id}"
    for name in ("tasks", "config", "llms", "metrics", "schema", "docs"):
        assert api.get(root[name]).status_code == 200, name
    documented.check("/api/v1/", "get", APIClient().get("/api/v1/"))
    wrong_method = api.get("/api/v1/developer/planner")
    assert wrong_method.status_code == 405 and wrong_method.json()["code"] == "method_not_allowed"
    assert "POST" in wrong_method["Allow"]  # as doc/api_endpoints.md says


# --- Serving the schema and the docs -------------------------------------------------------------


def test_the_schema_and_the_docs_answer_an_authenticated_client(api):
    for response in (
        api.get("/api/schema/", {"format": "json"}),
        api.get("/api/schema/", HTTP_ACCEPT="application/json"),
    ):
        assert response.status_code == 200
        assert "/api/v1/tasks/{task_id}" in json.loads(response.content)["paths"]
    assert api.get("/api/schema/").content.startswith(b"openapi: 3.0")  # YAML by default
    docs = api.get("/api/docs/")
    assert docs.status_code == 200
    assert b'"/api/schema/"' in docs.content


def test_the_docs_answer_an_admin_session(client, admin_user):
    client.force_login(admin_user)
    assert client.get("/api/docs/").status_code == 200
    assert client.get("/api/schema/").status_code == 200


@pytest.mark.parametrize("url", ["/api/schema/", "/api/docs/"])
def test_the_schema_and_the_docs_need_credentials(url):
    assert APIClient().get(url).status_code == 401
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert wrong.get(url).status_code == 401


def test_the_docs_page_loads_swagger_ui_from_this_server(api, settings):
    page = api.get("/api/docs/").content.decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any(asset.endswith("swagger-ui-bundle.js") for asset in assets), assets
    assert "cdn" not in page.lower()
    for asset in assets:
        assert asset.startswith("/" + settings.STATIC_URL.lstrip("/")), f"{asset} is not served by this server"
        relative = asset.removeprefix("/" + settings.STATIC_URL.lstrip("/"))
        assert relative.startswith("drf_spectacular_sidecar/")
        assert finders.find(relative), f"{relative} is not among the static files"
