"""Prefect flows and the `finetune` CLI: wiring only, no ML code."""
