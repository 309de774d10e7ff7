"""Evaluation: batched greedy generation with per-sample adapters, metrics and reports."""
