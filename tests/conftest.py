import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbloader import load_notebook  # noqa: E402


@pytest.fixture(scope="session")
def nb():
    """The notebook's `#| export` cells as a module."""
    return load_notebook()


@pytest.fixture(autouse=True)
def the_notebook_module_stays(request):
    """A test that loads the notebook again in the test process (importing tiny_run does) puts a second module
    under the name dino_vit, and the session's classes then no longer pickle: a torch.save of a Config failed
    in a later file. This names the test that did it."""
    before = sys.modules.get("dino_vit")
    yield
    assert before is None or sys.modules.get("dino_vit") is before, \
        f"{request.node.nodeid} replaced sys.modules['dino_vit']: load the notebook in a subprocess"
