"""Each configured LLM's health, from its engine's cheap check, run in parallel and kept a few seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from balancer.configuration import Configuration, LLMConfig
from llm_engines.base import Health
from llm_engines.errors import EngineError
from llm_engines.registry import get_engine

# How long a check's answer is reused, so that a busy status page does not hammer the engines.
TTL_S = 10.0


class HealthChecker:
    def __init__(self, *, ttl_s: float = TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._results: dict[str, tuple[float, str, Health, float]] = {}
        self._lock = threading.Lock()

    def _check(self, llm: LLMConfig) -> Health:
        """The LLM's health. Never raises: ``check`` runs every LLM's at once, and one that raised would
        fail them all (the status page, and a worker's health loop, which then counted no failure)."""
        started = time.perf_counter()
        try:
            return get_engine(llm.engine, llm.engine_settings(), key=llm.id).health()
        except EngineError as exc:  # the engine cannot even be built (a missing key, a missing model file)
            return Health(False, str(exc), time.perf_counter() - started)
        except Exception as exc:
            # The engine's check failed in a way it did not foresee: the LLM is not known to serve.
            detail = f"the health check failed: {type(exc).__name__}: {exc}"[:500]
            return Health(False, detail, time.perf_counter() - started)

    def check(
        self, config: Configuration, *, on_failure: Callable[[LLMConfig], None] | None = None
    ) -> dict[str, tuple[Health, float]]:
        """{llm id: (health, when it was checked)} for every LLM, enabled or not. ``on_failure`` is
        called for each enabled LLM whose fresh check failed (the balancer counts it, rule 3)."""
        now = self.clock()
        due = []
        results: dict[str, tuple[Health, float]] = {}
        for llm in config.llms.values():
            fingerprint = repr(sorted(llm.engine_settings().items()))
            cached = self._results.get(llm.id)
            if cached and cached[1] == fingerprint and now - cached[0] < self.ttl_s:
                results[llm.id] = (cached[2], cached[3])
            else:
                due.append((llm, fingerprint))
        if due:
            with ThreadPoolExecutor(max_workers=min(8, len(due))) as pool:
                checked = list(pool.map(lambda item: self._check(item[0]), due))
            with self._lock:
                for (llm, fingerprint), health in zip(due, checked, strict=True):
                    self._results[llm.id] = (now, fingerprint, health, time.time())
                    results[llm.id] = (health, time.time())
            if on_failure is not None:
                for (llm, _), health in zip(due, checked, strict=True):
                    if llm.toggle and not health.ok:
                        on_failure(llm)
        return results


checker = HealthChecker()
