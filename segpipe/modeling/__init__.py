"""Segmentation methods: one module per method, a plain dict registry, weight loading."""
