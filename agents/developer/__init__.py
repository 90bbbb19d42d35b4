"""The developer profile's agents: diagnosis, architect, planner, the coders, QA and debug."""
