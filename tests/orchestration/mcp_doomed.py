"""A consumer of the inbound channel that handles one message and is killed (SIGKILL) before it
acknowledges it: the test of reclaiming runs it as a process of its own."""

import os
import signal
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiagentserver.settings")
django.setup()

from orchestration import mcp_handler  # noqa: E402  (after django.setup)


def handle_then_die(entry: mcp_handler.Entry, pipe) -> None:
    mcp_handler.handle_inbound(entry, pipe)  # the task is submitted; its answer and ack are not sent
    print(f"handled {entry.id}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


consumer = mcp_handler.Consumer({mcp_handler.INBOUND: handle_then_die}, name=sys.argv[1])
consumer.ensure_groups()
print("ready", flush=True)
while True:
    consumer.poll(block_ms=1000)
