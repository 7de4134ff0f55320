"""Planning: the canonical problem, guarded capture, the choice of strategy, plans, tuning."""
