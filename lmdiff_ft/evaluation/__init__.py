"""Evaluation: answer metrics from generations, likelihood scores, and the before/after reports."""
