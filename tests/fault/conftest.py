"""Fault tests start service processes as the end-to-end tests do: ``service_stack`` of
tests/conftest.py, whose Redis database counter both folders share (a second copy of the fixture
would hand a fault test's stack a database an earlier e2e stack of the same run had used)."""
