"""Fixtures for the storage SCP and rule tests."""
