"""The only place that composes Ray Data stages."""
