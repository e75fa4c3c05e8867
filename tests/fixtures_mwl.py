"""Fixtures for the Modality Worklist tests."""
