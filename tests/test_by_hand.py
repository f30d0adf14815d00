"""The notebook driven by hand, in real Jupyter kernels: each section runs in a fresh kernel after only
the Setup cells and the definitions (`#| export` cells) above it; settings changed in a live kernel never
mix runs; a cell that fails leaves the cells after it a clear error, not a stale object."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from jupyter_client.manager import start_new_kernel

ROOT = Path(__file__).resolve().parent.parent
EXPORT_MARK = "#| export"


def notebook_sections():
    """[(section title, [code sources])] in notebook order; a section starts at a level-2 heading."""
    sections = []
    for cell in json.loads((ROOT / "dino_vit.ipynb").read_text())["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "markdown" and src.startswith("## "):
            sections.append((src.splitlines()[0][3:].strip(), []))
        elif cell["cell_type"] == "code" and sections:
            sections[-1][1].append(src)
    return sections


SECTIONS = notebook_sections()
TITLES = [title for title, _ in SECTIONS]


class Kernel:
    """A real kernel, started in the repository root, that runs cells and reports errors and output."""

    def __init__(self):
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(ROOT))

    def run(self, code, timeout=600):
        """(error or None, printed text): an error is 'Name: message'."""
        printed, error = [], []

        def hook(msg):
            content = msg["content"]
            if msg["msg_type"] == "stream":
                printed.append(content["text"])
            elif msg["msg_type"] == "error":
                error.append(f"{content['ename']}: {content['evalue']}")

        self.client.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False)
        return (error[0] if error else None), "".join(printed)

    def run_ok(self, code, timeout=600):
        error, printed = self.run(code, timeout)
        assert error is None, f"{error}\nin cell:\n{code[:400]}\nprinted:\n{printed[-2000:]}"
        return printed

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """The embedded sample and its cache are built once for the module."""
    return tmp_path_factory.mktemp("data")


def small_overrides(shared, run_root, **extra):
    """The demo profile, smaller (a few steps), with every file it writes under temporary folders."""
    return dict(cache_dir=str(shared / "cache"), embedded_dir=str(shared / "embedded"),
                checkpoint_dir=str(run_root / "checkpoints"), figure_dir=str(run_root / "figures"),
                max_train_images=64, batch_size=16, max_eval_images=64, probe_epochs=5, **extra)


def start_with_setup(overrides):
    """A fresh kernel with the Setup section run, `overrides` set right after the parameters cell."""
    kernel = Kernel()
    setup = SECTIONS[0][1]
    for src in setup:
        kernel.run_ok(src)
        if src.startswith('profile = os.environ.get("DINO_PROFILE"'):
            kernel.run_ok(f"profile = 'demo'\noverrides = {overrides!r}")
    return kernel


def run_definitions_above(kernel, title):
    for section, sources in SECTIONS[1:TITLES.index(title)]:
        for src in sources:
            if src.lstrip().startswith(EXPORT_MARK):
                kernel.run_ok(src)


@pytest.mark.parametrize("title", TITLES[1:])
def test_a_section_needs_only_the_definitions_above_it(title, shared_dirs, tmp_path):
    kernel = start_with_setup(small_overrides(shared_dirs, tmp_path))
    try:
        run_definitions_above(kernel, title)
        for src in dict(SECTIONS)[title]:
            kernel.run_ok(src)
    finally:
        kernel.close()
