"""The configuration as rows, for the admin to edit.

configuration.json is the truth. These rows are a copy of it, refreshed from
the file whenever the file changes (``config_store.sync_from_file``); an edit
in the admin is validated as a whole configuration and written back to the
file, which every process reads.
"""

from django.db import models

from balancer.configuration import CAPABILITIES, SOURCES


def _capabilities_help() -> str:
    return f"a JSON list from {', '.join(sorted(CAPABILITIES))}"


class LLM(models.Model):
    llm_id = models.CharField("id", max_length=128, unique=True)
    position = models.PositiveIntegerField(default=0, help_text="order in configuration.json")
    engine = models.CharField(max_length=64)
    source = models.CharField(max_length=16, choices=[(s, s) for s in sorted(SOURCES)], default="local")
    model = models.CharField(max_length=256)
    base_url = models.CharField(max_length=512, blank=True)
    api_key_env = models.CharField(
        "API key environment variable",
        max_length=128,
        blank=True,
        help_text="the name of the environment variable that holds the key, never the key itself",
    )
    toggle = models.BooleanField(default=True, help_text="off: never used")
    locked = models.BooleanField(default=False, help_text="on: only for the roles that list it as preferred")
    capabilities = models.JSONField(default=list, help_text=_capabilities_help())
    context_length = models.PositiveIntegerField(default=2048)
    max_concurrency = models.PositiveIntegerField(default=1)
    cost_per_1k_tokens = models.JSONField(
        default=dict, blank=True, help_text='api LLMs: {"prompt": …, "completion": …}'
    )
    weight = models.FloatField(default=1.0)
    options = models.JSONField(default=dict, blank=True, help_text="the engine's own settings")

    class Meta:
        ordering = ["position", "llm_id"]
        verbose_name = "LLM"

    def __str__(self) -> str:
        return self.llm_id


class Profile(models.Model):
    name = models.CharField(max_length=64, unique=True)
    position = models.PositiveIntegerField(default=0)
    default_llms = models.JSONField(default=list, blank=True, help_text="a JSON list of LLM ids")
    daily_budget = models.FloatField(
        null=True, blank=True, help_text="what api LLMs with a cost may spend per UTC day; empty: no limit"
    )

    class Meta:
        ordering = ["position", "name"]

    def __str__(self) -> str:
        return self.name


class Role(models.Model):
    profile = models.ForeignKey(Profile, on_delete=models.CASCADE, related_name="roles")
    name = models.CharField(max_length=64)
    position = models.PositiveIntegerField(default=0)
    agent = models.CharField(max_length=64, default="generic")
    system_prompt = models.TextField()
    capabilities = models.JSONField(default=list, help_text=_capabilities_help())
    preferred_llms = models.JSONField(default=list, blank=True, help_text="a JSON list of LLM ids, in order")
    max_tokens = models.PositiveIntegerField(default=256)
    temperature = models.FloatField(default=0.7)
    time_limit_s = models.FloatField(default=300)
    max_iterations = models.PositiveIntegerField(default=3)

    class Meta:
        ordering = ["profile__position", "position", "name"]
        constraints = [models.UniqueConstraint(fields=["profile", "name"], name="role_unique_per_profile")]

    def __str__(self) -> str:
        return f"{self.profile.name}/{self.name}"


class ConfigurationFile(models.Model):
    """What the rows were last synchronised with: the file's stamp, and its last problem."""

    path = models.CharField(max_length=1024, unique=True)
    stamp = models.CharField(max_length=128, blank=True)
    error = models.TextField(blank=True)
    synced_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.path


class Spending(models.Model):
    """Rule 7: a profile's spending on paid APIs on one day (UTC), which the load balancer also counts in
    Redis; kept here so that a Redis restarted without its data does not let the budget be spent again."""

    profile = models.CharField(max_length=64)
    day = models.CharField(max_length=10, help_text="YYYY-MM-DD, UTC")
    amount = models.FloatField(default=0.0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["profile", "day"], name="spending_profile_day")]
        verbose_name = verbose_name_plural = "spending"

    def __str__(self) -> str:
        return f"{self.profile} {self.day}: {self.amount:g}"
