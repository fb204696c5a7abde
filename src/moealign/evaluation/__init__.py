"""Evaluation (DESIGN.md §7): LM loss, generation, multiple choice, metrics, routing diagnostics,
statistics, CTGI."""
