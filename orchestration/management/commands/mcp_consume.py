"""Consume the MCP channels: submit inbound task packets, take outside feedback, aggregate metrics."""

from __future__ import annotations

import logging
import signal
import time

import redis
from django.core.management.base import BaseCommand
from django.db import close_old_connections

from orchestration import mcp_handler

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Read the ai-agent-server.tasks.inbound, .tasks.feedback and .metrics Redis Streams in the consumer "
        "group 'ai-agent-server' until stopped (SIGTERM or Ctrl-C). Several may run: each message goes to one."
    )

    def add_arguments(self, parser):
        parser.add_argument("--name", help="this consumer's name in the group (default: host-pid)")
        parser.add_argument(
            "--block-ms", type=int, default=1000, choices=range(1, 1501), metavar="1-1500",
            help="how long one read waits for messages (under the connection's 2 s timeout)",
        )  # fmt: skip
        parser.add_argument("--claim-idle", type=float, help="seconds before a dead consumer's message is taken over")

    def handle(self, *args, **options):
        stopping: list[int] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda received, _frame: stopping.append(received))
        consumer = mcp_handler.server_consumer(name=options["name"], claim_idle_s=options["claim_idle"])
        while not stopping and not self._retrying(consumer.ensure_groups):
            pass
        self._retrying(consumer.forget_dead_consumers)
        self.stdout.write(f"consuming {', '.join(mcp_handler.CHANNELS)} as {consumer.name}")
        self.stdout.flush()
        while not stopping:
            self._retrying(lambda: consumer.poll(block_ms=options["block_ms"]))
            close_old_connections()
        self._retrying(consumer.leave)  # what is pending for it stays, for another consumer

    @staticmethod
    def _retrying(step) -> bool:
        """Run ``step``; when it fails (Redis away, or a bug a message brought out), log, wait and say so
        (False). The consumer never stops on a failure: the message it was on is delivered again."""
        try:
            step()
        except redis.RedisError as exc:
            logger.warning("Redis is unavailable (%s); trying again in 2 s", exc)
        except Exception:
            logger.exception("the consumer failed; trying again in 2 s")
        else:
            return True
        time.sleep(2)
        return False
