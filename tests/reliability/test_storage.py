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
from orchestration.state_store import MARKER

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
    """Every file in the state directory but the lock files and its marker: task files and temporary files."""
    return sorted(
        str(p.relative_to(state))
        for p in state.rglob("*")
        if p.is_file() and ".locks" not in p.parts and p.name != MARKER
    )


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
    assert not (state / ".locks" / f"{task_id}.lock").exists()  # nor a lock file (each refusal left one)
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


def test_a_step_whose_record_finds_the_disk_full_is_left_to_run_again_not_failed(
    small_state_dir, edit_config, tmp_path, monkeypatch
):
    """Found by a fault-injection session: the step's record failed with ENOSPC, the smaller write that failed
    the task fitted, and the task was failed for good, its answer thrown away; a full disk is an outage, like
    Redis away, and the step runs again once there is room (a recorded step stays recorded)."""
    from orchestration.orchestration_engine import task_step
    from orchestration.packets import new_packet
    from orchestration.runtime import task_store
    from orchestration.state_store import StorageUnavailable, TaskStore
    from tests.orchestration.scripted import use_script

    summary = {"match": r'Reply with JSON: \{"summary"', "reply": {"summary": "Short.", "key_points": ["short"]}}
    use_script(edit_config, tmp_path / "script.json", [summary])
    packet = new_packet(task_id=str(uuid.uuid4()), profile="productivity", role="summarizer", payload={"input": "x"})
    task_store().create(packet)
    filler = small_state_dir / "filler"
    real_write = TaskStore._write

    filled: list[bool] = []

    def filling_the_disk_first(self, packet, *, new=False):
        if not filled and any(event["event"] == "step" for event in packet["history"]):
            filled.append(True)  # the step's record, once: the disk filled while the LLM answered
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
        return real_write(self, packet, new=new)

    monkeypatch.setattr(TaskStore, "_write", filling_the_disk_first)
    job_id = str(uuid.uuid4())
    with pytest.raises(StorageUnavailable):
        task_step(task_id=packet["task_id"], job_id=job_id, worker="test")
    left = task_store().read(packet["task_id"])
    assert (left["status"], [e["event"] for e in left["history"]]) == ("running", ["claimed"])

    filler.unlink()  # room again: the job delivered again (or queued again by the sweep) runs the step
    assert task_step(task_id=packet["task_id"], job_id=job_id, worker="test") == "succeeded"
    assert task_store().read(packet["task_id"])["result"]["summary"] == "Short."
