"""Ensembling several models' instances: ``fuse`` (pure per-image fusion)."""
