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
        today = Spending.objects.filter(profile=profile, day=day)
        if today.update(amount=F("amount") + amount):
            return
        try:
            with transaction.atomic():  # a savepoint, should the caller be in a transaction
                Spending.objects.create(profile=profile, day=day, amount=amount)
        except IntegrityError:  # another process made the row meanwhile
            today.update(amount=F("amount") + amount)
