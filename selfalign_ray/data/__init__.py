"""Inputs (personas, seeds, corpora) and outputs (preference shards, rejects, manifests)."""
