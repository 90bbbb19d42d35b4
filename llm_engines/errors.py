"""The errors an engine raises, each saying whether retrying elsewhere can help."""

from __future__ import annotations


class EngineError(Exception):
    """An engine call failed. ``transient`` says whether another try (here or elsewhere) can help."""

    transient: bool = False
    # The LLM itself is at fault (its credentials, its configuration, a model it does not serve):
    # retrying it cannot help, but another LLM may serve the call.
    llm_at_fault: bool = False

    def __init__(self, message: str, *, engine: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.engine = engine

    def __str__(self) -> str:
        return f"{self.engine}: {self.message}" if self.engine else self.message


class EngineUnavailable(EngineError):
    """The engine cannot be reached or is not ready; ``retry_after`` is in seconds when its server said how
    long it needs (a 503 with ``Retry-After``: a model still loading, an overloaded proxy)."""

    transient = True

    def __init__(self, message: str, *, engine: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, engine=engine)
        self.retry_after = retry_after


class EngineTimeout(EngineError):
    """The call did not finish within its timeout."""

    transient = True


class EngineCancelled(EngineError):
    """The caller cancelled the call (``ChatOptions.cancel``): a client that left, a step whose lease went to
    another worker. Not the LLM's failure."""

    def __init__(self, *, engine: str | None = None) -> None:
        super().__init__("the call was cancelled by its caller", engine=engine)


class EngineRateLimited(EngineError):
    """The engine asked us to slow down; ``retry_after`` is in seconds when it said."""

    transient = True

    def __init__(self, message: str, *, engine: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, engine=engine)
        self.retry_after = retry_after


class EngineQuotaExceeded(EngineRateLimited):
    """The LLM's account has no quota left (OpenAI's 429 ``insufficient_quota``): a 429 like a rate limit,
    but time does not lift it, so retrying that LLM cannot help; another LLM may serve the call."""

    transient = False
    llm_at_fault = True


class EngineBadRequest(EngineError):
    """The request itself is wrong; sending it again anywhere fails the same way."""


class RequestTooLarge(EngineBadRequest):
    """The request is larger than the LLM's account may send at once (OpenAI's 429 "Request too large … tokens
    per min"): this LLM can never take it, another may. Not the LLM's failure, and no time lifts it."""


class ContextTooLong(EngineBadRequest):
    """The prompt and the requested completion do not fit the model's context."""


class EngineAuthError(EngineError):
    """The engine refused the credentials, or none were given."""

    llm_at_fault = True


class EngineConfigurationError(EngineError):
    """The engine's settings are wrong (a missing model file, a model the server does not have)."""

    llm_at_fault = True
