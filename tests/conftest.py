import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbloader import load_notebook  # noqa: E402


@pytest.fixture(scope="session")
def nb():
    """The notebook's `#| export` cells as a module."""
    return load_notebook()
