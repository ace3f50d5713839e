"""Every test in tests/parity/ compares our output with an outside reference: it carries the
``parity`` marker (``python -m pytest -m parity`` runs these, ``-m "not parity"`` the rest).
Tests elsewhere that compare with a reference carry ``@pytest.mark.parity`` themselves."""
import pytest


def pytest_itemcollected(item):
    # pytest asks a conftest's per-item hooks only about the items under its own folder
    item.add_marker(pytest.mark.parity)
