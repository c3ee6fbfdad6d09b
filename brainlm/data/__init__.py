"""Data layer: ingest, parcellate, scale, split, store, synthetic."""
