"""Loaders of every dataset shape, validation, atomic I/O and content hashes."""
