"""Tests that the server keeps working under faults, load and hostile input (issue 7)."""
