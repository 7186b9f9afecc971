"""Benchmarks behind `segpipe bench ...`: each measures, prints a table and returns JSON-able results."""
