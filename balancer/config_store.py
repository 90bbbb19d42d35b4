"""Between configuration.json and the rows the admin edits.

The file is the truth. ``sync_from_file`` copies it into the rows when it has
changed since the last copy (a broken file is recorded, not copied);
``check_rows`` validates the rows, with one edited or removed row, as a whole
configuration; ``save_rows_to_file`` writes them back atomically. Every
process picks the new file up at its next use of the configuration.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from django.db import models, transaction

from balancer.configuration import (
    Configuration,
    ConfigurationError,
    file_stamp,
    load_configuration,
    parse_configuration,
)
from balancer.files import atomic_write, close_lock, open_for_lock
from balancer.models import LLM, ConfigurationFile, Profile, Role

logger = logging.getLogger(__name__)


def _rows(model: type[models.Model], replace: models.Model | None, remove: models.Model | None) -> list:
    rows = [row for row in model.objects.all() if not (remove is not None and row.pk == remove.pk)]
    if replace is not None and isinstance(replace, model):
        rows = [replace if row.pk == replace.pk else row for row in rows]
        if replace.pk is None or all(row is not replace for row in rows):
            rows.append(replace)
    return sorted(rows, key=lambda row: row.position)


def raw_from_rows(*, replace: models.Model | None = None, remove: models.Model | None = None) -> dict[str, Any]:
    """The configuration file's content from the rows, with ``replace`` in place of its stored row
    (or added) and without ``remove``."""
    llms = []
    for llm in _rows(LLM, replace, remove):
        entry: dict[str, Any] = {
            "id": llm.llm_id, "engine": llm.engine, "source": llm.source, "model": llm.model,
            "toggle": llm.toggle, "locked": llm.locked, "capabilities": llm.capabilities,
            "context_length": llm.context_length, "max_concurrency": llm.max_concurrency,
        }  # fmt: skip
        for key in ("base_url", "api_key_env", "cost_per_1k_tokens", "options"):
            if getattr(llm, key):
                entry[key] = getattr(llm, key)
        if llm.weight != 1.0:
            entry["weight"] = llm.weight
        llms.append(entry)
    profiles: dict[str, Any] = {}
    removed_profile = remove.pk if isinstance(remove, Profile) else None
    by_pk = {}
    for profile in _rows(Profile, replace, remove):
        by_pk[profile.pk] = profile
        profiles[profile.name] = {"default_llms": profile.default_llms, "roles": {}}
        if profile.daily_budget is not None:
            profiles[profile.name]["daily_budget"] = profile.daily_budget
    for role in _rows(Role, replace, remove):
        if role.profile_id == removed_profile:
            continue
        profile = by_pk.get(role.profile_id) or role.profile
        profiles.setdefault(profile.name, {"default_llms": profile.default_llms, "roles": {}})
        profiles[profile.name]["roles"][role.name] = {
            "agent": role.agent, "system_prompt": role.system_prompt, "capabilities": role.capabilities,
            "preferred_llms": role.preferred_llms, "max_tokens": role.max_tokens, "temperature": role.temperature,
            "time_limit_s": role.time_limit_s, "max_iterations": role.max_iterations,
        }  # fmt: skip
    return {"llms": llms, "profiles": profiles}


def check_rows(
    *,
    known_agents: Collection[str],
    time_limit_below_s: float | None = None,
    replace: models.Model | None = None,
    remove: models.Model | None = None,
) -> dict[str, Any]:
    """The raw configuration of the rows (with the edit), or ``ConfigurationError`` naming every bad field."""
    raw = raw_from_rows(replace=replace, remove=remove)
    parse_configuration(
        raw, source="the configuration with this change", known_agents=known_agents,
        time_limit_below_s=time_limit_below_s,
    )  # fmt: skip
    return raw


@contextlib.contextmanager
def editing(path: Path) -> Iterator[None]:
    """The configuration's edit lock, shared by every process on the machine (a lock file beside the file,
    ``.<name>.lock``): held while a change is checked against the file and written to it, so that two
    changes made at once go one after the other, and the second is checked against the file as the
    first left it. Not reentrant: the holder must not take it again. Where the lock cannot be had (a
    directory this process may not write, where no save could write the file either; a file system
    that refuses the lock), the pages go on without it, and say so in the log."""
    lock = path.with_name(f".{path.name}.lock")
    fd = None
    try:
        try:
            # Read-write: NFSv4 takes an exclusive flock as a write lock, refused on a read-only descriptor.
            fd = open_for_lock(lambda: os.open(lock, os.O_RDWR | os.O_CREAT, 0o644))
        except PermissionError:  # a lock file another user made: flock itself needs no write access
            fd = open_for_lock(lambda: os.open(lock, os.O_RDONLY))
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        logger.warning("the configuration's edit lock %s cannot be taken (%s); going on without it", lock, exc)
    try:
        yield
    finally:
        if fd is not None:
            close_lock(fd)  # closing the descriptor releases the lock


def write_file(path: Path, raw: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(raw, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def save_rows_to_file(path: Path, *, known_agents: Collection[str], time_limit_below_s: float | None = None) -> None:
    """Validate the rows as they are now and write them to the file."""
    raw = check_rows(known_agents=known_agents, time_limit_below_s=time_limit_below_s)
    write_file(path, raw)
    ConfigurationFile.objects.update_or_create(path=str(path), defaults={"stamp": file_stamp(path), "error": ""})


def _import(config: Configuration) -> None:
    """Make the rows match ``config``, updating rows in place by their names (so that an admin page
    open on one stays valid), creating the new ones and deleting the ones that are gone."""
    LLM.objects.exclude(llm_id__in=list(config.llms)).delete()
    for position, llm in enumerate(config.llms.values()):
        LLM.objects.update_or_create(
            llm_id=llm.id,
            defaults={
                "position": position, "engine": llm.engine, "source": llm.source, "model": llm.model,
                "base_url": llm.base_url or "", "api_key_env": llm.api_key_env or "", "toggle": llm.toggle,
                "locked": llm.locked, "capabilities": sorted(llm.capabilities), "context_length": llm.context_length,
                "max_concurrency": llm.max_concurrency, "cost_per_1k_tokens": dict(llm.cost_per_1k_tokens),
                "weight": llm.weight, "options": dict(llm.options),
            },
        )  # fmt: skip
    Profile.objects.exclude(name__in=list(config.profiles)).delete()
    for profile_position, profile in enumerate(config.profiles.values()):
        row, _ = Profile.objects.update_or_create(
            name=profile.name,
            defaults={
                "position": profile_position,
                "default_llms": list(profile.default_llms),
                "daily_budget": profile.daily_budget,
            },
        )
        Role.objects.filter(profile=row).exclude(name__in=list(profile.roles)).delete()
        for position, role in enumerate(profile.roles.values()):
            Role.objects.update_or_create(
                profile=row,
                name=role.name,
                defaults={
                    "position": position, "agent": role.agent, "system_prompt": role.system_prompt,
                    "capabilities": sorted(role.capabilities), "preferred_llms": list(role.preferred_llms),
                    "max_tokens": role.max_tokens, "temperature": role.temperature,
                    "time_limit_s": role.time_limit_s, "max_iterations": role.max_iterations,
                },
            )  # fmt: skip


def sync_from_file(path: Path, *, known_agents: Collection[str], time_limit_below_s: float | None = None) -> str:
    """Copy the file into the rows if it changed since the last copy. Returns the file's current
    problem ("" when it is valid); a broken file leaves the rows as they were."""
    stamp = file_stamp(path)
    state, _ = ConfigurationFile.objects.get_or_create(path=str(path))
    if state.stamp == stamp and state.stamp:
        return state.error
    try:
        config = load_configuration(path, known_agents=known_agents, time_limit_below_s=time_limit_below_s)
    except ConfigurationError as exc:
        logger.error("configuration not loaded into the admin: %s", exc)
        state.stamp, state.error = stamp, str(exc)
        state.save()
        return state.error
    with transaction.atomic():
        _import(config)
        state.stamp, state.error = stamp, ""
        state.save()
    return ""
