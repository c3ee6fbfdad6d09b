"""Prefect flows: thin orchestration over brainlm/ (added with the pipeline)."""
