"""Search spaces as data (YAML), loaded and validated by jobs.tune."""
