"""End-to-end tests run separate service processes on real Kafka/MinIO/Redis: the
``service_stack`` fixture of tests/conftest.py (shared with tests/fault), one namespace per stack.
"""
