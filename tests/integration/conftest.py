"""Fixtures of the integration tests beyond tests/conftest.py."""

from tests.sandboxes import sandbox_factory

__all__ = ["sandbox_factory"]
