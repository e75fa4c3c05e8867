"""Fixtures for the HL7 / MLLP tests."""
