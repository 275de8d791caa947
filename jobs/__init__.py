"""Entry points: `python -m jobs.<step>` locally or under `ray job submit`. Thin wiring over imgcls_core."""
