"""The agent base class: payload validation, prompt, one engine call, result."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from balancer.configuration import Configuration, LLMConfig, RoleConfig
from balancer.load_balancer import LoadBalancer, estimate_tokens
from llm_engines.base import ChatOptions, ChatResult, Message
from llm_engines.registry import get_engine


class PayloadError(ValueError):
    """A payload that the agent cannot accept; ``field`` is its path inside the payload."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class AgentOutcome:
    """What one step produced: the result for the packet, and what the history records of the call."""

    result: dict[str, Any]
    llm: str
    model: str
    decision: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    time_to_first_token_ms: float | None
    finish_reason: str | None

    def step_detail(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "latency_ms": round(self.latency_ms, 1),
            "time_to_first_token_ms": None
            if self.time_to_first_token_ms is None
            else round(self.time_to_first_token_ms, 1),
            "finish_reason": self.finish_reason,
            "balancer": self.decision,
        }


class Agent(ABC):
    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def validate_payload(cls, payload: Any) -> dict[str, Any]:
        """The payload, checked; ``PayloadError`` naming the field otherwise."""

    @abstractmethod
    def build_messages(self, payload: Mapping[str, Any], role: RoleConfig) -> list[Message]:
        """The chat messages for this payload."""

    @abstractmethod
    def parse_result(self, reply: ChatResult) -> dict[str, Any]:
        """The task's result from the model's reply."""

    def run(
        self,
        *,
        payload: Mapping[str, Any],
        role: RoleConfig,
        config: Configuration,
        balancer: LoadBalancer,
        deadline: float | None = None,
        sticky: str | None = None,
    ) -> AgentOutcome:
        """One step: the prompt, an LLM from the balancer (which waits, fails over and records), the
        result. ``deadline`` is on the balancer's clock."""
        messages = self.build_messages(payload, role)

        def call(llm: LLMConfig) -> ChatResult:
            timeout = None if deadline is None else max(deadline - balancer.clock(), 1.0)
            options = ChatOptions(max_tokens=role.max_tokens, temperature=role.temperature, timeout=timeout)
            return get_engine(llm.engine, llm.engine_settings(), key=llm.id).chat(messages, options)

        reply, decision = balancer.run(
            config,
            role,
            call,
            prompt_tokens=estimate_tokens(messages),
            deadline=deadline,
            sticky=sticky,
            budget=config.profiles[role.profile].daily_budget,
        )
        return AgentOutcome(
            result=self.parse_result(reply),
            llm=decision.llm.id,
            model=reply.model,
            decision=decision.as_detail(),
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            latency_ms=reply.latency_s * 1000,
            time_to_first_token_ms=None if reply.time_to_first_token_s is None else reply.time_to_first_token_s * 1000,
            finish_reason=reply.finish_reason,
        )
