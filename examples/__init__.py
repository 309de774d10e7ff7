"""Worked examples of extending t2l-framework (see docs/extending.md); importable from the repo root."""
