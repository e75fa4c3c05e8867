"""Fixtures for delivery tests: Orthanc as the destination PACS, Celery workers, a Redis of our own."""
