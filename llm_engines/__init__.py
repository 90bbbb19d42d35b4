"""LLM engines behind one interface: llama.cpp in-process (and, later, Ollama and OpenAI-compatible APIs).

An engine knows models and messages, nothing of roles or tasks.
"""
