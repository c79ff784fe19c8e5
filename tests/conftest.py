"""Shared test setup: every test starts its own Ray, never one another process left on this machine."""
import pytest


@pytest.fixture(autouse=True)
def _no_inherited_ray_address(monkeypatch):
    # A RAY_ADDRESS from the caller's shell would make the embedded engine join a foreign cluster.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
