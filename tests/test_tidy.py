"""The committed notebook's tidying: progress bars end as their final line, timestamps go."""
import json

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
