"""The models and their migrations agree: a change to a model (an index, a field's help text) ships its
migration. Found by a later session: the capabilities' help text had gained "tools" without one, so
``makemigrations --check`` failed on a clean clone."""

import io

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_every_model_change_has_its_migration():
    out = io.StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    except SystemExit as exit_:
        pytest.fail(f"a model change has no migration (exit {exit_.code}):\n{out.getvalue()}")
