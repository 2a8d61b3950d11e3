"""Workflows: `posttrain pipeline CONFIG` runs recipe stages in order in one run directory."""
