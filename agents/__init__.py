"""Agents: each turns a task's payload into a prompt and the model's reply into a result.

An agent asks the balancer for an LLM and calls its engine; it neither stores
nor routes (that is the orchestration's work).
"""
