"""The configuration (LLMs, profiles, roles) and the load balancer that picks an LLM for a role.

The balancer knows LLMs and roles, not tasks.
"""
