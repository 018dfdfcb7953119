"""Rewrite metrics, scoring, general ability, fluency/consistency, and the evaluation run with its summary and plots."""
