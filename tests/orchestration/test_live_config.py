"""The issue's "done when": an operator adds an OpenAI-compatible or an Ollama endpoint, in the admin
or in configuration.json, toggles it, and the next task uses it, with no restart of any process."""

import json

import pytest

from balancer.models import LLM, Role
from tests.conftest import wait_for
from tests.orchestration.test_config_admin import llm_form, role_form

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def run_writer_task(api) -> dict:
    response = api.post(
        "/api/v1/productivity/writer",
        data=json.dumps({"payload": {"input": "Write one sentence about the sea."}}),
        content_type="application/json",
    )
    assert response.status_code == 202
    done = wait_for(response.json()["task_id"])
    assert done["status"] == "succeeded", done["history"]
    return done["history"][-2]


def test_an_openai_endpoint_added_and_toggled_in_the_admin(
    admin_client, api, celery_worker, openai_server, edit_config
):
    admin_client.get("/admin/balancer/llm/")
    options = json.dumps({"structured_output": "json_object"})
    response = admin_client.post(
        "/admin/balancer/llm/add/",
        llm_form(llm_id="local-openai", engine="openai", source="local", model="smollm2", base_url=openai_server,
                 context_length=512, options=options),
    )  # fmt: skip
    assert response.status_code == 302, response.content.decode()[:3000]
    writer = Role.objects.get(profile__name="productivity", name="writer")
    response = admin_client.post(
        f"/admin/balancer/role/{writer.pk}/change/", role_form(writer, preferred_llms='["local-openai"]', max_tokens=64)
    )
    assert response.status_code == 302

    step = run_writer_task(api)
    assert step["llm"] == "local-openai"
    assert step["detail"]["model"] == "smollm2"  # the name llama-cpp-python's server answers with

    llm = LLM.objects.get(llm_id="local-openai")
    form = {"form-TOTAL_FORMS": "1", "form-INITIAL_FORMS": "1", "form-MIN_NUM_FORMS": "0",
            "form-MAX_NUM_FORMS": "1000", "form-0-id": str(llm.pk), "_save": "Save"}  # fmt: skip
    assert admin_client.post("/admin/balancer/llm/?engine=openai", form).status_code == 302

    step = run_writer_task(api)
    assert step["llm"] == "smollm2-135m"
    assert step["detail"]["balancer"]["excluded"] == {"local-openai": "rule 1: toggled off"}


def test_an_ollama_endpoint_added_in_configuration_json(api, celery_worker, ollama_server, edit_config):
    def add_ollama(raw):
        raw["llms"].append(
            {"id": "ollama-smol", "engine": "ollama", "source": "local", "model": "smollm2:135m",
             "base_url": ollama_server, "context_length": 512}
        )  # fmt: skip
        # The test servers open a 512-token context: the role's prompt and reply must fit it (rule 1).
        raw["profiles"]["productivity"]["roles"]["writer"].update(preferred_llms=["ollama-smol"], max_tokens=64)

    edit_config(add_ollama)
    step = run_writer_task(api)
    assert step["llm"] == "ollama-smol"
    assert step["detail"]["model"] == "smollm2:135m"
    assert step["detail"]["tokens"]["completion"] > 0
