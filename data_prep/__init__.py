"""Converters from raw datasets to fovlm shards, and the synthetic demo dataset."""
