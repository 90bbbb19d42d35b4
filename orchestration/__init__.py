"""The orchestration layer: task packets and their state, the engine that runs them, and the REST API."""
