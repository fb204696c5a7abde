"""Routing manifold alignment during training (DESIGN.md §4): the alignment term, its priors and
the guardrails."""
