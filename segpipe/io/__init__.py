"""Filesystems (fsspec, injected), listing and sharding, image decoding."""
