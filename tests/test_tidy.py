"""The committed notebook's tidying: progress bars end as their final line, timestamps go."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tidy_notebook import tidy


def stream(text):
    return {"output_type": "stream", "name": "stdout", "text": text}


def test_progress_bar_refreshes_collapse_to_final_lines_and_timestamps_go(tmp_path):
    nb = {"cells": [{"cell_type": "code", "execution_count": 1, "id": "a",
                     "metadata": {"execution": {"iopub.execute_input": "2026-01-01T00:00:00Z"}, "tags": []},
                     "outputs": [stream(["epoch 1:   0%| 0/20\r"]), stream("epoch 1:  50%| 10/20\r"),
                                 stream(["epoch 1: 100%| 20/20\n", "epoch 2:   0%|\r"]),
                                 {"output_type": "display_data", "data": {"text/plain": "x"}, "metadata": {}},
                                 stream("epoch 2: 100%| 20/20\n")],
                     "source": "train()"}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    tidy(path)
    cell = json.loads(path.read_text())["cells"][0]
    assert cell["metadata"] == {"tags": []}
    outputs = cell["outputs"]
    assert [o["output_type"] for o in outputs] == ["stream", "display_data", "stream"]
    assert "".join(outputs[0]["text"]) == "epoch 1: 100%| 20/20\nepoch 2:   0%|"
    assert "".join(outputs[2]["text"]) == "epoch 2: 100%| 20/20\n"


def test_the_tools_read_and_write_the_notebook_as_utf8_under_an_ascii_locale(tmp_path):
    """The notebook holds 'café', '×' and progress-bar blocks. Where Python's own encoding is ASCII (LC_ALL=C
    with its UTF-8 mode off), the loader of the tests and tidy_notebook.py failed with UnicodeDecodeError."""
    here = Path(__file__).resolve().parent
    copy = tmp_path / "dino_vit.ipynb"
    copy.write_bytes((here.parent / "dino_vit.ipynb").read_bytes())
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from nbloader import load_notebook; "
              "from tidy_notebook import tidy; import locale; print(locale.getpreferredencoding(False)); "
              "nb = load_notebook(sys.argv[2]); tidy(sys.argv[2]); print(nb.ShapesDataset.__name__)")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script, str(here), str(copy)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ANSI_X3.4-1968", "ShapesDataset"]
    assert json.loads(copy.read_text(encoding="utf-8"))["cells"]   # tidied, still UTF-8 JSON
