"""Errors, registries and safe file writes shared by every stage."""
