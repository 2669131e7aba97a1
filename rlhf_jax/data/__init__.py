"""Datasets as TFDS ArrayRecord folders (tfds_io), grain loaders (pipeline) and user-file converters (real)."""
