"""Rule 7's ledger in the database (balancer/spending.py)."""

import threading

import pytest
from django.db import connections

from balancer.spending import DatabaseLedger


@pytest.mark.django_db
def test_the_ledger_adds_by_profile_and_day():
    ledger = DatabaseLedger()
    assert ledger.total("p", "2026-12-03") == 0.0
    ledger.add("p", "2026-12-03", 0.25)
    ledger.add("p", "2026-12-03", 0.5)
    ledger.add("p", "2026-12-04", 1.0)
    ledger.add("q", "2026-12-03", 2.0)
    assert ledger.total("p", "2026-12-03") == pytest.approx(0.75)
    assert ledger.total("p", "2026-12-04") == pytest.approx(1.0)


@pytest.mark.django_db(transaction=True)
def test_additions_at_once_from_several_threads_are_all_counted():
    ledger = DatabaseLedger()
    start = threading.Barrier(4)

    def add():
        try:
            start.wait()
            for _ in range(10):
                ledger.add("p", "2026-12-03", 0.5)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.total("p", "2026-12-03") == pytest.approx(20.0)


def test_the_servers_balancer_keeps_its_spending_in_the_database():
    from orchestration.runtime import load_balancer

    assert isinstance(load_balancer().ledger, DatabaseLedger)


@pytest.mark.django_db
def test_the_admin_lists_the_spending_read_only(admin_client):
    DatabaseLedger().add("developer", "2026-12-03", 1.25)
    page = admin_client.get("/admin/balancer/spending/")
    assert page.status_code == 200
    assert "developer" in page.content.decode() and "1.25" in page.content.decode()
    assert admin_client.get("/admin/balancer/spending/add/").status_code == 403
