"""Load the `#| export` cells of dino_vit.ipynb into a module.

Tests, benchmarks and the multi-GPU launcher import the notebook's own code through this loader, so
what they run is what the notebook defines. `DINO_NOTEBOOK` points it at another notebook file.
"""
import json
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPORT_MARK = "#| export"


def is_export(src):
    """Whether a code cell's source is a definitions cell (its first line `#| export`)."""
    return src.lstrip().startswith(EXPORT_MARK)


def export_sources(path):
    """The source of every code cell whose first line is `#| export`, in notebook order."""
    try:
        nb = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot read notebook {path}: {e}") from e
    sources = []
    for cell in nb["cells"]:
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        if cell["cell_type"] == "code" and is_export(src):
            sources.append(src)
    return sources


def load_notebook(path=None, name="dino_vit"):
    """Execute the export cells in a fresh module registered as sys.modules[name] and return it."""
    path = Path(path or os.environ.get("DINO_NOTEBOOK") or ROOT / "dino_vit.ipynb")
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses and pickle look classes up here
    for i, src in enumerate(export_sources(path)):
        exec(compile(src, f"{path.name}[export {i}]", "exec"), module.__dict__)
    return module
