"""Tidy an executed notebook for committing: what a reader sees, without what varies between runs.

- progress bars: a stream output that redraws a line with carriage returns keeps only the final
  state of each line, and consecutive stream outputs of one cell merge, so a tqdm bar ends as one
  line per epoch instead of dozens of refreshes;
- execution timestamps (`metadata.execution`) are dropped.
Usage: python tests/tidy_notebook.py dino_vit.ipynb [more.ipynb ...]   (rewrites the files in place)
"""
import json
import sys
from pathlib import Path


def final_lines(text):
    """Each line as the terminal would end up showing it: the part after its last carriage return."""
    lines = text.split("\n")
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)


def tidy_outputs(outputs):
    tidied = []
    for out in outputs:
        if out.get("output_type") == "stream":
            text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
            if tidied and tidied[-1].get("output_type") == "stream" and tidied[-1]["name"] == out["name"]:
                text = tidied.pop()["text"] + text
            out = dict(out, text=text)
        tidied.append(out)
    for out in tidied:
        if out.get("output_type") == "stream":
            out["text"] = final_lines(out["text"]).splitlines(keepends=True)
    return tidied


def tidy(path):
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        if cell["cell_type"] == "code":
            cell["outputs"] = tidy_outputs(cell["outputs"])
    path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    for name in sys.argv[1:] or ["dino_vit.ipynb"]:
        tidy(name)
