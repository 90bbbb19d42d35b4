"""A full or read-only state directory: a submit fails with a clear 507 or 503, nothing half-written is
left, and the tasks already stored stay whole. The state directory is a real small filesystem (a
tmpfs mounted for the test), which needs root: elsewhere these tests are skipped."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from orchestration.models import Task

pytestmark = pytest.mark.django_db


@pytest.fixture
def small_state_dir(tmp_path, settings):
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    settings.TASKS_STATE_DIR = mount / "state"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def submit(api, text: str = "Plan a release.", task_id: str | None = None):
    body = {"payload": {"input": text}, **({"task_id": task_id} if task_id else {})}
    return api.post("/api/v1/developer/planner", data=json.dumps(body), content_type="application/json")


def leftovers(state: Path) -> list[str]:
    """Every file in the state directory but the lock files: task files and temporary files."""
    return sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file() and ".locks" not in p.parts)


def test_a_full_state_directory_is_a_507_and_leaves_nothing_half_written(api, small_state_dir):
    stored = submit(api, "A task stored before the disk filled.")
    assert stored.status_code == 202
    state = small_state_dir / "state"
    before = (state / f"{stored.json()['task_id']}.json").read_bytes()
    filler = small_state_dir / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)  # until ENOSPC

    task_id = str(uuid.uuid4())
    response = submit(api, "x" * 8_000, task_id=task_id)  # more than the 4 KB dd may leave, within the context
    assert response.status_code == 507
    assert response.json()["code"] == "insufficient_storage"
    assert "full" in response.json()["detail"]
    assert leftovers(state) == [f"{stored.json()['task_id']}.json"]  # no task file, no temporary file
    assert not Task.objects.filter(task_id=task_id).exists()
    assert (state / f"{stored.json()['task_id']}.json").read_bytes() == before

    filler.unlink()  # space again: the same request goes through
    assert submit(api, "x" * 8_000, task_id=task_id).status_code == 202


def test_a_read_only_state_directory_is_a_503_and_stored_tasks_stay_readable(api, small_state_dir):
    stored = submit(api, "A task stored before the disk went read-only.")
    assert stored.status_code == 202
    subprocess.run(["mount", "-o", "remount,ro", str(small_state_dir)], check=True)

    response = submit(api)
    assert response.status_code == 503
    assert response.json()["code"] == "storage_unavailable"
    assert "Read-only file system" in response.json()["detail"]
    assert api.get(f"/api/v1/tasks/{stored.json()['task_id']}").status_code == 200
    cancel = api.post(f"/api/v1/tasks/{stored.json()['task_id']}/cancel")
    assert (cancel.status_code, cancel.json()["code"]) == (503, "storage_unavailable")
    assert leftovers(small_state_dir / "state") == [f"{stored.json()['task_id']}.json"]
