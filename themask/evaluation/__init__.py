"""Evaluation: metrics, split evaluation, streaming prediction, pictures (docs/ARCHITECTURE.md)."""
