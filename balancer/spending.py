"""Rule 7's ledger in the database: each profile's spending by day, besides the count in Redis."""

from __future__ import annotations

from django.db import IntegrityError, transaction
from django.db.models import F

from balancer.models import Spending


class DatabaseLedger:
    """``load_balancer.SpendingLedger`` on the ``Spending`` table."""

    def total(self, profile: str, day: str) -> float:
        row = Spending.objects.filter(profile=profile, day=day).values_list("amount", flat=True).first()
        return float(row or 0.0)

    def add(self, profile: str, day: str, amount: float) -> None:
        with transaction.atomic():
            if Spending.objects.filter(profile=profile, day=day).update(amount=F("amount") + amount):
                return
            try:
                with transaction.atomic():  # a savepoint: another process may have made the row meanwhile
                    Spending.objects.create(profile=profile, day=day, amount=amount)
                    return
            except IntegrityError:
                pass
            Spending.objects.filter(profile=profile, day=day).update(amount=F("amount") + amount)
