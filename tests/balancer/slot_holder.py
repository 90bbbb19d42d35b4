"""A second process for the balancer tests: takes one slot of an LLM, says so, and holds it until killed.

Run: python -m tests.balancer.slot_holder REDIS_URL LLM_ID NOW LEASE_S
"""

import sys
import time

import redis

from balancer.configuration import parse_configuration
from balancer.load_balancer import Decision, LoadBalancer, Policy


def main() -> None:
    url, llm_id, now, lease_s = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    config = parse_configuration(
        {
            "llms": [{"id": llm_id, "engine": "instant", "source": "local", "model": "m", "max_concurrency": 1}],
            "profiles": {"tp": {"roles": {"r": {"agent": "generic", "system_prompt": "s"}}}},
        }
    )
    balancer = LoadBalancer(redis.Redis.from_url(url), clock=lambda: now, policy=Policy(slot_lease_s=lease_s))
    decision = balancer.select(config, config.role("tp", "r"))
    print("held" if isinstance(decision, Decision) else "full", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
