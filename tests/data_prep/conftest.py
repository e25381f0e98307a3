"""Fixtures of the data_prep tests (helpers live in prepkit.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def manifest_of():
    """Load a shard set's manifest.json."""

    def load(folder: Path) -> dict[str, Any]:
        return json.loads((folder / "manifest.json").read_text())

    return load
