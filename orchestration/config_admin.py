"""The admin's pages for the configuration: LLMs, profiles and roles.

Every page first refreshes the rows from configuration.json if the file
changed (a broken file is shown as an error and not loaded). A save validates
the whole configuration with the change, names every bad field, and writes the
file back atomically; every web and worker process uses the new file at its
next use of the configuration.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import redis
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db import transaction
from django.forms.formsets import (
    INITIAL_FORM_COUNT,
    MAX_NUM_FORM_COUNT,
    MIN_NUM_FORM_COUNT,
    TOTAL_FORM_COUNT,
    ManagementForm,
)
from django.forms.models import BaseModelFormSet, construct_instance
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.utils.functional import cached_property

from balancer import config_store
from balancer.configuration import ConfigurationError, file_stamp
from balancer.models import LLM, ConfigurationFile, Profile, Role, Spending
from orchestration.runtime import configuration, load_balancer, validation

_page = threading.local()  # what the LLM list's page read for its rows


def _path() -> Path:
    return Path(settings.AIAGENT_CONFIG)


def _synced_stamp() -> str | None:
    return ConfigurationFile.objects.filter(path=str(_path())).values_list("stamp", flat=True).first()


def _refusal(loaded: str | None) -> str | None:
    """Why a save or a delete made on a page loaded when the file's stamp was ``loaded`` must not write the
    file, or None. The page's rows are the file as it was then; and when the file on disk does not validate
    (a hand edit with a mistake), the rows are the last good file, not this one: writing them would replace
    the hand edit, its good parts too, with no one having seen it."""
    stamp = file_stamp(_path())
    if loaded != stamp:
        return (
            f"{_path()} has changed since this page was loaded; nothing was saved. "
            "Open the page again to see the file as it is now."
        )
    error = ConfigurationFile.objects.filter(path=str(_path()), stamp=stamp).values_list("error", flat=True).first()
    if error:
        return (
            f"{_path()} does not validate, so these rows are the last configuration that did, not the file: "
            f"saving them would replace the file's edits. Nothing was saved; fix the file first. {error}"
        )
    return None


def _rendered(response: HttpResponse) -> HttpResponse:
    """The response with its template rendered now (a ``TemplateResponse`` renders after the view returns)."""
    if hasattr(response, "render"):
        response.render()
    return response


class ConfigurationForm(forms.ModelForm):
    """Validates the whole configuration as it would be with this form's change."""

    # The file's stamp when the page was loaded, sent back with the form: a save compares it with the file
    # as it is, so that it cannot overwrite an edit made meanwhile, in the admin (which updates the rows'
    # stamp too) or by hand.
    # Its initial value is read when the page is rendered (after the page's refresh from the file), once.
    loaded_stamp = forms.CharField(widget=forms.HiddenInput, required=False, initial=_synced_stamp)

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        # A form posted without the stamp (a client of its own) is held to the rows' last synchronisation.
        refusal = _refusal(cleaned.get("loaded_stamp") or _synced_stamp())
        if refusal:
            raise forms.ValidationError(refusal)
        candidate = construct_instance(self, copy.copy(self.instance))
        try:
            config_store.check_rows(**validation(), replace=candidate)
        except ConfigurationError as exc:
            for path, reason in exc.problems:
                self.add_error(None, f"{path}: {reason}" if path else reason)
        return cleaned


class ChangelistForm(ConfigurationForm):
    loaded_stamp = None  # the page's is in its formset's management form (one for the page, not one a row)


class StampedManagementForm(ManagementForm):
    loaded_stamp = forms.CharField(widget=forms.HiddenInput, required=False)


class ChangelistFormSet(BaseModelFormSet):
    """The LLM list's editable columns, with the file's stamp when the page was loaded: a list loaded
    before another edit would otherwise save its rows' old values over it."""

    @cached_property
    def management_form(self) -> ManagementForm:
        # Django's own, with the stamp (its ManagementForm cannot be given to a formset otherwise).
        options = {"auto_id": self.auto_id, "prefix": self.prefix, "renderer": self.renderer}
        if self.is_bound:
            form = StampedManagementForm(self.data, **options)
            form.full_clean()
            return form
        counts = {
            TOTAL_FORM_COUNT: self.total_form_count(),
            INITIAL_FORM_COUNT: self.initial_form_count(),
            MIN_NUM_FORM_COUNT: self.min_num,
            MAX_NUM_FORM_COUNT: self.max_num,
        }
        return StampedManagementForm(initial={**counts, "loaded_stamp": _synced_stamp()}, **options)

    def clean(self):
        super().clean()
        refusal = _refusal(self.management_form.cleaned_data.get("loaded_stamp") or _synced_stamp())
        if refusal:
            raise forms.ValidationError(refusal)


class ConfigurationAdmin(admin.ModelAdmin):
    form = ConfigurationForm

    def _sync(self, request: HttpRequest) -> None:
        error = config_store.sync_from_file(_path(), **validation())
        if error:
            messages.error(request, f"{_path()} was not loaded; the server keeps its previous configuration. {error}")

    # Each page runs under the configuration's edit lock, its refresh from the file, the handling of its
    # form and its rendering alike: two saves posted at once are each checked against the file as the
    # other left it (the second is refused as made on a page loaded before the first), rather than both
    # checked against the file as it was and both written; and a page shows the rows and the stamp of
    # the same moment (its stamp is read as it renders).

    def changelist_view(self, request, extra_context=None):
        with config_store.editing(_path()):
            self._sync(request)
            return _rendered(super().changelist_view(request, extra_context))

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        with config_store.editing(_path()):
            if request.method == "GET":
                self._sync(request)
            return _rendered(super().changeform_view(request, object_id, form_url, extra_context))

    def get_changelist_formset(self, request, **kwargs):
        return super().get_changelist_formset(request, formset=ChangelistFormSet, **kwargs)

    def get_changelist_form(self, request, **kwargs):
        # The list's editable columns (toggle, locked) validate the same way as the form; its rows carry no
        # stamp of their own (one query a row), and are held to the rows' last synchronisation.
        return super().get_changelist_form(request, form=ChangelistForm, **kwargs)

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # deletions go one by one, each validated
        return actions

    def save_model(self, request, obj, form, change):
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            config_store.save_rows_to_file(_path(), **validation())

    def delete_view(self, request, object_id, extra_context=None):
        with config_store.editing(_path()):
            return _rendered(self._checked_delete_view(request, object_id, extra_context))

    def _checked_delete_view(self, request, object_id, extra_context=None):
        obj = self.get_object(request, object_id)
        if request.method == "POST" and obj is not None:
            refusal = _refusal(_synced_stamp())
            if refusal:
                messages.error(request, f"{obj} was not deleted: {refusal}")
                return HttpResponseRedirect(request.path.rsplit("/delete/", 1)[0] + "/change/")
            try:
                config_store.check_rows(**validation(), remove=obj)
            except ConfigurationError as exc:
                problems = "; ".join(f"{path}: {reason}" for path, reason in exc.problems)
                messages.error(request, f"{obj} was not deleted: {problems}")
                return HttpResponseRedirect(request.path.rsplit("/delete/", 1)[0] + "/change/")
        return super().delete_view(request, object_id, extra_context)

    def delete_model(self, request, obj):
        with transaction.atomic():
            super().delete_model(request, obj)
            config_store.save_rows_to_file(_path(), **validation())


@admin.register(LLM)
class LLMAdmin(ConfigurationAdmin):
    list_display = ("llm_id", "engine", "source", "model", "toggle", "locked", "context_length", "state")
    list_editable = ("toggle", "locked")
    list_filter = ("engine", "source", "toggle", "locked")
    search_fields = ("llm_id", "model")

    def changelist_view(self, request, extra_context=None):
        # One read of the shared state for the whole page (per thread: the admin is shared by the threads
        # of the process, and the page renders in the view's thread).
        try:
            _page.states = load_balancer().states(configuration())
        except redis.RedisError:
            _page.states = None
            messages.warning(request, "Redis does not answer: the LLMs' states cannot be shown.")
        return super().changelist_view(request, extra_context)

    @admin.display(description="state (breaker · in flight · latency)")
    def state(self, obj: LLM) -> str:
        states = getattr(_page, "states", None)
        if states is None:
            return "unknown (Redis does not answer)"
        state = states.get(obj.llm_id)
        if state is None:
            return "not in force"
        breaker = state["breaker"] if state["breaker"] != "open" else f"cooling down until {state['cooling_until']}"
        latency = (
            f"{state['ttft_ms']} ms to first token, {state['ms_per_token']} ms/token"
            if state["samples"]
            else "no samples yet"
        )
        return f"{breaker} · {state['in_flight']}/{state['max_concurrency']} in flight · {latency}"


@admin.register(Profile)
class ProfileAdmin(ConfigurationAdmin):
    list_display = ("name", "default_llms", "position")


@admin.register(Role)
class RoleAdmin(ConfigurationAdmin):
    list_display = ("name", "profile", "agent", "preferred_llms", "max_tokens", "time_limit_s")
    list_filter = ("profile", "agent")
    search_fields = ("name", "system_prompt")


@admin.register(Spending)
class SpendingAdmin(admin.ModelAdmin):
    """Rule 7's ledger: what each profile with a daily budget spent on paid APIs, by day (UTC). Read-only:
    the load balancer writes it."""

    list_display = ("profile", "day", "amount", "budget")
    list_filter = ("profile",)
    ordering = ("-day", "profile")

    @admin.display(description="daily budget (in force)")
    def budget(self, obj: Spending) -> float | None:
        profile = configuration().profiles.get(obj.profile)
        return profile.daily_budget if profile else None

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Spending | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Spending | None = None) -> bool:
        return False
