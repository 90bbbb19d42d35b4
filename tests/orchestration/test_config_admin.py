"""Editing the configuration in the admin and by hand: validation, write-back, and pick-up."""

import json

import pytest

from balancer.models import LLM, Role
from orchestration.runtime import configuration

pytestmark = pytest.mark.django_db

LLM_LIST = "/admin/balancer/llm/"


def llm_form(**overrides):
    data = {
        "llm_id": "extra", "position": 5, "engine": "instant", "source": "local", "model": "echo",
        "base_url": "", "api_key_env": "", "toggle": "on", "capabilities": '["chat"]', "context_length": 2048,
        "max_concurrency": 1, "cost_per_1k_tokens": "{}", "weight": 1.0, "options": "{}",
    }  # fmt: skip
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def role_form(role: Role, **overrides):
    data = {
        "profile": role.profile_id, "name": role.name, "position": role.position, "agent": role.agent,
        "system_prompt": role.system_prompt, "capabilities": json.dumps(role.capabilities),
        "preferred_llms": json.dumps(role.preferred_llms), "max_tokens": role.max_tokens,
        "temperature": role.temperature, "time_limit_s": role.time_limit_s, "max_iterations": role.max_iterations,
    }  # fmt: skip
    data.update(overrides)
    return data


def test_the_admin_shows_the_file_and_adds_an_llm_to_it(admin_client, config_file, edit_config):
    listing = admin_client.get(LLM_LIST)
    assert listing.status_code == 200
    assert "smollm2-135m" in listing.content.decode()
    assert "/1 in flight" in listing.content.decode()  # the balancer's state of each LLM
    response = admin_client.post(f"{LLM_LIST}add/", llm_form())
    assert response.status_code == 302, response.content.decode()[:2000]
    written = json.loads(config_file.read_text())
    assert [llm["id"] for llm in written["llms"]] == ["smollm2-135m", "extra"]
    assert "extra" in configuration().llms


def test_toggle_and_locked_are_editable_in_the_list(admin_client, config_file, edit_config):
    listing = admin_client.get(LLM_LIST).content.decode()
    # One stamp for the page, in the formset's management form; the rows carry none (a query a row).
    assert listing.count('name="loaded_stamp"') == 0 and listing.count('name="form-loaded_stamp"') == 1
    llm = LLM.objects.get(llm_id="smollm2-135m")
    response = admin_client.post(
        LLM_LIST,
        {
            "form-TOTAL_FORMS": "1", "form-INITIAL_FORMS": "1", "form-MIN_NUM_FORMS": "0",
            "form-MAX_NUM_FORMS": "1000", "form-0-id": str(llm.pk), "form-0-locked": "on", "_save": "Save",
        },
    )  # fmt: skip
    assert response.status_code == 302
    written = json.loads(config_file.read_text())["llms"][0]
    assert written["toggle"] is False
    assert written["locked"] is True
    assert configuration().llms["smollm2-135m"].toggle is False


def test_a_list_loaded_before_another_edit_does_not_save_its_old_values_over_it(admin_client, config_file, edit_config):
    """The list's rows were held to the rows' last refresh: a list page loaded before someone turned an LLM
    off in its own page posted the LLM's old toggle back, turning it on again."""
    import re

    listing = admin_client.get(LLM_LIST).content.decode()
    stamp = re.search(r'name="form-loaded_stamp" value="([^"]*)"', listing).group(1)
    llm = LLM.objects.get(llm_id="smollm2-135m")
    edit_config(lambda raw: raw["llms"][0].update(toggle=False))  # turned off meanwhile
    admin_client.get(LLM_LIST)  # the rows follow the file (another page's refresh)
    edited = config_file.read_text()
    response = admin_client.post(
        LLM_LIST,
        {
            "form-TOTAL_FORMS": "1", "form-INITIAL_FORMS": "1", "form-MIN_NUM_FORMS": "0",
            "form-MAX_NUM_FORMS": "1000", "form-loaded_stamp": stamp, "form-0-id": str(llm.pk),
            "form-0-toggle": "on", "_save": "Save",
        },
    )  # fmt: skip
    assert response.status_code == 200
    assert "has changed since this page was loaded" in response.content.decode()
    assert config_file.read_text() == edited


def test_an_invalid_edit_names_the_field_and_leaves_the_file(admin_client, config_file, edit_config):
    admin_client.get(LLM_LIST)
    before = config_file.read_text()
    role = Role.objects.get(profile__name="developer", name="planner")
    response = admin_client.post(f"/admin/balancer/role/{role.pk}/change/", role_form(role, preferred_llms='["ghost"]'))
    assert response.status_code == 200
    page = response.content.decode()
    assert "profiles.developer.roles.planner.preferred_llms[0]" in page
    assert "ghost" in page
    assert config_file.read_text() == before


def test_a_time_limit_past_the_visibility_timeout_is_refused_on_save(admin_client, config_file, settings):
    admin_client.get(LLM_LIST)
    before = config_file.read_text()
    role = Role.objects.get(profile__name="developer", name="planner")
    timeout = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    response = admin_client.post(f"/admin/balancer/role/{role.pk}/change/", role_form(role, time_limit_s=timeout))
    assert response.status_code == 200
    assert "profiles.developer.roles.planner.time_limit_s" in response.content.decode()
    assert config_file.read_text() == before


def test_a_secret_cannot_be_entered(admin_client, config_file, edit_config):
    admin_client.get(LLM_LIST)
    before = config_file.read_text()
    response = admin_client.post(f"{LLM_LIST}add/", llm_form(api_key_env="sk-proj-abcdef123"))
    assert response.status_code == 200
    assert "never the key itself" in response.content.decode()
    assert config_file.read_text() == before


def test_deleting_an_llm_that_roles_name_is_refused(admin_client, config_file, edit_config):
    admin_client.get(LLM_LIST)
    before = config_file.read_text()
    llm = LLM.objects.get(llm_id="smollm2-135m")
    response = admin_client.post(f"{LLM_LIST}{llm.pk}/delete/", {"post": "yes"}, follow=True)
    assert "was not deleted" in response.content.decode()
    assert LLM.objects.filter(pk=llm.pk).exists()
    assert config_file.read_text() == before


def test_an_llm_no_role_names_is_deleted_from_the_rows_and_the_file(admin_client, config_file, edit_config):
    """The delete page recursed until Python's limit (a 500) once it ran under the edit lock."""
    admin_client.get(LLM_LIST)
    assert admin_client.post(f"{LLM_LIST}add/", llm_form()).status_code == 302
    llm = LLM.objects.get(llm_id="extra")
    assert admin_client.get(f"{LLM_LIST}{llm.pk}/delete/").status_code == 200
    assert admin_client.post(f"{LLM_LIST}{llm.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not LLM.objects.filter(pk=llm.pk).exists()
    assert [item["id"] for item in json.loads(config_file.read_text())["llms"]] == ["smollm2-135m"]


def test_a_hand_edit_is_picked_up_and_a_broken_one_is_not(admin_client, api, config_file, edit_config):
    assert configuration().profiles["developer"].roles["planner"].max_tokens == 832
    admin_client.get(LLM_LIST)
    planner_pk = Role.objects.get(profile__name="developer", name="planner").pk
    edit_config(lambda raw: raw["profiles"]["developer"]["roles"]["planner"].update(max_tokens=99))
    assert configuration().profiles["developer"].roles["planner"].max_tokens == 99
    admin_client.get(LLM_LIST)
    planner = Role.objects.get(profile__name="developer", name="planner")
    assert planner.max_tokens == 99
    assert planner.pk == planner_pk  # updated in place: a page open on it stays valid

    config_file.write_text('{"llms": [}')
    assert configuration().profiles["developer"].roles["planner"].max_tokens == 99  # the last good one
    page = admin_client.get(LLM_LIST, follow=True).content.decode()
    assert "was not loaded" in page
    assert "not valid JSON" in page
    assert Role.objects.get(profile__name="developer", name="planner").max_tokens == 99
    shown = api.get("/api/v1/config").json()
    assert "not valid JSON" in shown["error"]
    assert shown["profiles"]["developer"]["roles"]["planner"]["max_tokens"] == 99


def test_config_and_llms_endpoints(api):
    config = api.get("/api/v1/config").json()
    assert config["error"] is None
    assert config["profiles"]["productivity"]["roles"]["writer"]["queue"] == "productivity.writer"
    llms = api.get("/api/v1/llms").json()["results"]
    assert [llm["id"] for llm in llms] == ["smollm2-135m"]
    assert llms[0]["health"]["ok"] is True
    assert "present" in llms[0]["health"]["detail"]
    assert llms[0]["state"]["max_concurrency"] == 1
    assert llms[0]["state"]["breaker"] == "closed"


def test_an_llm_whose_key_is_missing_is_reported_unhealthy(api, edit_config, monkeypatch):
    monkeypatch.delenv("AIAGENT_MISSING_KEY", raising=False)
    edit_config(
        lambda raw: raw["llms"].append(
            {"id": "remote", "engine": "openai", "source": "api", "model": "gpt", "base_url": "http://127.0.0.1:9/v1",
             "api_key_env": "AIAGENT_MISSING_KEY"}
        )
    )  # fmt: skip
    llms = {llm["id"]: llm for llm in api.get("/api/v1/llms").json()["results"]}
    assert llms["remote"]["health"]["ok"] is False
    assert "AIAGENT_MISSING_KEY is not set" in llms["remote"]["health"]["detail"]
    assert llms["remote"]["api_key_env"] == "AIAGENT_MISSING_KEY"


def test_a_save_does_not_overwrite_a_hand_edit_made_meanwhile(admin_client, config_file, edit_config):
    admin_client.get(LLM_LIST)
    edit_config(lambda raw: raw["profiles"]["developer"]["roles"]["planner"].update(max_tokens=77))
    edited = config_file.read_text()
    response = admin_client.post(f"{LLM_LIST}add/", llm_form())
    assert response.status_code == 200
    assert "has changed since this page was loaded" in response.content.decode()
    assert config_file.read_text() == edited


def test_a_save_or_a_delete_does_not_replace_a_hand_edit_that_does_not_validate(admin_client, config_file, edit_config):
    """Found by review: a hand edit with one mistake (and a new LLM) was shown as "not loaded"; a save from the
    page then passed the stamp check (the page had seen the broken file) and wrote the old rows over the file,
    the new LLM with them."""
    admin_client.get(LLM_LIST)
    assert admin_client.post(f"{LLM_LIST}add/", llm_form()).status_code == 302

    def mistake(raw):
        raw["llms"].append({"id": "hand", "engine": "instant", "source": "local", "model": "echo"})
        raw["profiles"]["developer"]["roles"]["planner"]["max_tokenz"] = 5

    edit_config(mistake)
    edited = config_file.read_text()
    assert "was not loaded" in admin_client.get(LLM_LIST).content.decode()
    planner = Role.objects.get(profile__name="developer", name="planner")
    response = admin_client.post(f"/admin/balancer/role/{planner.pk}/change/", role_form(planner, max_tokens=800))
    assert response.status_code == 200
    assert "does not validate" in response.content.decode() and "max_tokenz" in response.content.decode()
    extra = LLM.objects.get(llm_id="extra")
    response = admin_client.post(f"{LLM_LIST}{extra.pk}/delete/", {"post": "yes"}, follow=True)
    assert "was not deleted" in response.content.decode() and "does not validate" in response.content.decode()
    listed = admin_client.post(
        LLM_LIST,
        {
            "form-TOTAL_FORMS": "1", "form-INITIAL_FORMS": "1", "form-MIN_NUM_FORMS": "0",
            "form-MAX_NUM_FORMS": "1000", "form-0-id": str(extra.pk), "form-0-locked": "on", "_save": "Save",
        },
    )  # fmt: skip
    assert listed.status_code == 200 and "does not validate" in listed.content.decode()
    assert config_file.read_text() == edited
    assert LLM.objects.filter(llm_id="extra").exists()

    # Fixed by hand, the file is loaded, and saves go through again.
    edit_config(lambda raw: raw["profiles"]["developer"]["roles"]["planner"].pop("max_tokenz"))
    assert "was not loaded" not in admin_client.get(LLM_LIST).content.decode()
    planner = Role.objects.get(profile__name="developer", name="planner")
    response = admin_client.post(f"/admin/balancer/role/{planner.pk}/change/", role_form(planner, max_tokens=800))
    assert response.status_code == 302, response.content.decode()[:2000]
    written = json.loads(config_file.read_text())
    assert "hand" in [llm["id"] for llm in written["llms"]]
    assert written["profiles"]["developer"]["roles"]["planner"]["max_tokens"] == 800


def test_a_save_from_a_page_loaded_before_another_save_is_refused(admin_client, config_file, edit_config):
    """Two people open the add page; the first saves. The second's form, from the file as it was, must not
    overwrite the first's edit (the rows' stamp was updated by that save, so it alone did not tell)."""
    import re

    page = admin_client.get(f"{LLM_LIST}add/").content.decode()
    stamp = re.search(r'name="loaded_stamp" value="([^"]*)"', page).group(1)
    assert stamp
    assert admin_client.post(f"{LLM_LIST}add/", llm_form(loaded_stamp=stamp)).status_code == 302
    edited = config_file.read_text()
    response = admin_client.post(f"{LLM_LIST}add/", llm_form(llm_id="other", loaded_stamp=stamp))
    assert response.status_code == 200
    assert "has changed since this page was loaded" in response.content.decode()
    assert config_file.read_text() == edited
    fresh = re.search(r'name="loaded_stamp" value="([^"]*)"', admin_client.get(f"{LLM_LIST}add/").content.decode())
    assert (
        admin_client.post(f"{LLM_LIST}add/", llm_form(llm_id="other", loaded_stamp=fresh.group(1))).status_code == 302
    )


def test_a_key_in_the_environment_never_reaches_the_file_the_api_or_the_admin(
    admin_client, api, config_file, edit_config, monkeypatch
):
    secret = "sk-live-do-not-leak-0123456789"
    monkeypatch.setenv("AIAGENT_LEAK_TEST_API_KEY", secret)
    admin_client.get(LLM_LIST)
    response = admin_client.post(
        f"{LLM_LIST}add/",
        llm_form(llm_id="remote", engine="openai", source="api", model="gpt", base_url="http://127.0.0.1:9/v1",
                 api_key_env="AIAGENT_LEAK_TEST_API_KEY"),
    )  # fmt: skip
    assert response.status_code == 302
    pages = [
        config_file.read_text(),
        api.get("/api/v1/config").content.decode(),
        api.get("/api/v1/llms").content.decode(),
        admin_client.get(LLM_LIST).content.decode(),
        admin_client.get(f"{LLM_LIST}{LLM.objects.get(llm_id='remote').pk}/change/").content.decode(),
    ]
    assert all(secret not in page for page in pages)
    assert all("AIAGENT_LEAK_TEST_API_KEY" in page for page in pages[:2])


def test_api_key_env_must_name_a_key_variable_and_base_url_must_carry_no_credentials(admin_client, edit_config):
    admin_client.get(LLM_LIST)
    for overrides, needle in (
        ({"api_key_env": "SECRET_KEY"}, "the server&#x27;s own setting"),
        ({"api_key_env": "HOME"}, "ending in _API_KEY"),
        ({"base_url": "https://user:sk-abc@example.com/v1"}, "must not carry credentials"),
        ({"base_url": "https://example.com/v1?api-key=sk-abc"}, "must not carry credentials"),
    ):
        form = llm_form(llm_id="remote", engine="openai", source="api", model="gpt", **overrides)
        page = admin_client.post(f"{LLM_LIST}add/", form).content.decode()
        assert needle in page, overrides


@pytest.mark.django_db(transaction=True)
def test_a_save_waits_for_the_edit_in_progress_and_is_then_checked_against_its_file(
    admin_client, config_file, edit_config
):
    """A save is checked against the file and written under the configuration's edit lock, so a save
    posted while another is being made waits for it, and is then refused as made on a page loaded
    before it. With SQLite the database's write lock queued them as well (its transactions begin
    IMMEDIATE); with PostgreSQL nothing did: both were checked against the file as it was before
    either wrote, and the second overwrote the first."""
    import re
    import threading

    from django.db import connection

    from balancer import config_store

    admin_client.get("/admin/balancer/role/")  # the rows from the file
    role = Role.objects.get(profile__name="developer", name="planner")
    url = f"/admin/balancer/role/{role.pk}/change/"
    stamp = re.search(r'name="loaded_stamp" value="([^"]*)"', admin_client.get(url).content.decode()).group(1)
    answers = []

    def save():
        try:
            answers.append(admin_client.post(url, role_form(role, max_tokens=88, loaded_stamp=stamp)))
        finally:
            connection.close()

    saving = threading.Thread(target=save)
    with config_store.editing(config_file):  # another save, in another process, is being made
        saving.start()
        saving.join(1.0)
        assert saving.is_alive(), "the save did not wait for the edit in progress"
        edit_config(lambda raw: raw["profiles"]["developer"]["roles"]["planner"].update(max_tokens=77))
    saving.join(30)
    assert answers[0].status_code == 200
    assert "has changed since this page was loaded" in answers[0].content.decode()
    assert json.loads(config_file.read_text())["profiles"]["developer"]["roles"]["planner"]["max_tokens"] == 77


def test_the_pages_still_open_where_the_edit_lock_cannot_be_taken(admin_client, config_file, edit_config, monkeypatch):
    """A file system that refuses the lock (NFSv4 refuses an exclusive flock on a read-only descriptor) made
    every configuration page a 500."""
    import errno

    from balancer import config_store

    def refused(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(config_store.fcntl, "flock", refused)
    assert admin_client.get(LLM_LIST).status_code == 200


def test_the_llm_list_opens_when_redis_does_not_answer(admin_client, config_file, edit_config, monkeypatch):
    import redis

    from orchestration import config_admin

    def gone():
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(config_admin, "load_balancer", lambda: type("Gone", (), {"states": lambda self, c: gone()})())
    page = admin_client.get(LLM_LIST)
    assert page.status_code == 200
    assert "unknown (Redis does not answer)" in page.content.decode()
