"""Provenance: the run manifest."""
