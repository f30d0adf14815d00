"""Every command of the README works as written: the names it passes are the notebook's parameters,
profiles and Config fields, and its papermill, nbconvert and Python lines run (on tiny settings, with
their paths pointed at temporary files). The papermill line runs the whole notebook on a folder of
images with epochs 1: every illustration cell passes on a user's settings, and the run evaluates, draws
and exports its own teacher, in its own folders."""
import ast
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
NOTEBOOK = json.loads((ROOT / "dino_vit.ipynb").read_text(encoding="utf-8"))
BIN = Path(sys.executable).parent
# a small model and a few images: the whole notebook in a few minutes on 2 CPU cores
TINY = dict(patch_size=16, out_dim=256, head_hidden_dim=64, head_bottleneck_dim=32, n_local_crops=2,
            batch_size=8, max_train_images=16, max_eval_images=32, probe_epochs=2, knn_k=5)


def commands(starts_with):
    """The README's shell lines that contain `starts_with`, continuation lines joined."""
    text = re.sub(r"\\\n\s*", "", README)
    return [line.strip() for line in text.splitlines() if starts_with in line]


def parameter_names():
    cell = next(c for c in NOTEBOOK["cells"] if "parameters" in c["metadata"].get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets}


def test_every_name_the_readme_passes_is_a_parameter_profile_or_field(nb):
    fields = {f.name for f in dataclasses.fields(nb.Config)}
    shown = re.findall(r"(?<![\w-])(?<!mkdir )-p (\w+) (\S+)", README)   # papermill's -p, not mkdir's
    assert {"profile"} <= {name for name, _ in shown} <= parameter_names() == {"profile", "overrides"}
    assert {value for name, value in shown if name == "profile"} <= set(nb.PROFILES)
    profiles = re.findall(r"(?:DINO_PROFILE=|--profile |PROFILE=)(\w+)", README)
    assert profiles and set(profiles) <= set(nb.PROFILES)
    overrides = [yaml.safe_load(f"{{{m}}}") for m in re.findall(r"overrides: \{([^}]*)\}", README)]
    assert len(overrides) >= 4 and set().union(*overrides) <= fields
    assigned = re.findall(r"[\s\"](\w+)=", " ".join(commands("--set") + commands("SET=")))
    assert {"data_root", "batch_size", "epochs", "run_name"} <= set(assigned) <= fields | {"SET", "PROFILE", "NPROC"}
    targets = set(re.findall(r"^(\w+):", (ROOT / "Makefile").read_text(), re.M))
    assert set(re.findall(r"make (\w+)", README)) <= targets
    assert all((ROOT / script).is_file() for script in re.findall(r"python (tests/\S+\.py)", README))


def setup_notebook(path):
    """The notebook up to its config cell (the Setup section's run), for the commands' quick checks."""
    cells, kept = NOTEBOOK["cells"], []
    for cell in cells:
        kept.append(cell)
        lines = "".join(cell["source"]).splitlines()
        if any(line.startswith("cfg = config_from_parameters(profile") for line in lines):
            break
    path.write_text(json.dumps({**NOTEBOOK, "cells": kept}))
    return path


def test_the_nbconvert_line_runs_the_profile_it_names(tmp_path):
    line = commands("nbconvert --to notebook --execute")[0]
    env_profile, *argv = shlex.split(line)
    argv = [str(BIN / "jupyter") if a.endswith("bin/jupyter") else a for a in argv]
    argv = [str(setup_notebook(tmp_path / "dino_vit.ipynb")) if a == "dino_vit.ipynb" else a for a in argv]
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "build")
    name, profile = env_profile.split("=")
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, name: profile})
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = json.loads((tmp_path / "build" / "dino_vit.ipynb").read_text(encoding="utf-8"))["cells"][-1]["outputs"]
    assert f"profile={profile} arch=vit_small/8" in "".join(outputs[0]["text"])


def papermill_argv(line, output, profile, overrides):
    """The README's papermill line with its output, profile and overrides replaced."""
    argv = shlex.split(line.split("&&")[-1])
    argv[0] = str(BIN / "papermill")
    argv[argv.index("build/run.ipynb" if "build/run.ipynb" in argv else "build/mine.ipynb")] = str(output)
    argv[argv.index("profile") + 1] = profile
    given = yaml.safe_load(argv[argv.index("-y") + 1])["overrides"]
    argv[argv.index("-y") + 1] = yaml.safe_dump({"overrides": {**given, **overrides}})
    return argv, given


def test_a_bad_setting_under_papermill_ends_with_its_message(tmp_path):
    argv, _ = papermill_argv(commands("papermill dino_vit.ipynb build/run.ipynb")[0], tmp_path / "out.ipynb",
                             "demo", {"lr": 0.1})
    argv[argv.index("dino_vit.ipynb")] = str(setup_notebook(tmp_path / "setup.ipynb"))
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("ConfigError: unknown Config field(s): 'lr' (did you mean 'base_lr' or 'min_lr' or "
                    "'probe_lr'?). The fields are those of the Config cell")
    cell_part = done.stderr.split('Exception encountered at "In [')[1]
    assert len(cell_part.strip().splitlines()) == 2   # the cell's number, then the message: no traceback


def write_photos(folder, classes=("bird", "boat", "tree"), per_class=8):
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB", (40 + 4 * i, 30), (60 * c, 30 * i % 256, 200 - 50 * c))
            image.save(folder / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    return folder


@pytest.fixture(scope="module")
def folder_run(nb, tmp_path_factory):
    """The README's papermill line on a folder of one's own images (a `~` path), epochs 1, init_from and
    own_images set: the whole notebook, headless. Two classes of two photographs, the fewest a split allows,
    so that every illustration is seen to work on a training split of 2 images (one batch of 2)."""
    import torch
    home = tmp_path_factory.mktemp("home")
    write_photos(home / "photos", classes=("bird", "tree"), per_class=2)
    torch.save(nb.vit_tiny(patch_size=16, img_size=64).state_dict(), home / "start.pth")
    work = tmp_path_factory.mktemp("work")
    overrides = dict(TINY, data_root="~/photos", epochs=1, init_from="~/start.pth", batch_size=2,
                     own_images=["~/photos/bird", "~/photos/tree/1.jpg"], cache_dir=str(work / "cache"),
                     embedded_dir=str(work / "embedded"), checkpoint_dir=str(work / "ck"),
                     figure_dir=str(work / "fig"))
    argv, given = papermill_argv(commands("papermill dino_vit.ipynb build/run.ipynb")[0], work / "run.ipynb",
                                 "demo", overrides)
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "HOME": str(home)})
    assert done.returncode == 0, done.stderr[-4000:]
    executed = json.loads((work / "run.ipynb").read_text(encoding="utf-8"))
    printed = "".join("".join(o.get("text", "")) for c in executed["cells"] if c["cell_type"] == "code"
                      for o in c.get("outputs", []))
    return dict(home=home, work=work, run=work / "ck" / given["run_name"], run_name=given["run_name"],
                printed=printed)


def test_a_folder_run_evaluates_its_own_teacher_not_the_demo_checkpoint(folder_run):
    run, home, printed = folder_run["run"], folder_run["home"], folder_run["printed"]
    data = f"data_root {home}/photos"
    assert f"evaluating {run}/teacher.pth (the teacher of run {run.name}, trained on {data}) on {data}, " \
           f"against start (start.pth)" in printed
    assert f"attention of {run}/teacher.pth" in printed
    assert "demo_vit_tiny8" not in printed and "37.1%" not in printed and "demo_long" not in printed
    assert f"DINO teacher: {run}/teacher.pth; data: {data}" in printed
    assert "start (start.pth)" in printed and "random init" not in printed    # the baseline is init_from's
    assert printed.count("the head starts fresh") == 1


def test_a_folder_run_writes_only_into_its_own_folders(folder_run):
    run, work = folder_run["run"], folder_run["work"]
    assert sorted(p.name for p in (work / "ck").iterdir()) == [run.name]    # nothing named after a checkpoint
    assert sorted(p.name for p in (work / "fig").iterdir()) == [run.name]
    figures = {p.name for p in (work / "fig" / run.name).iterdir()}
    assert {"data_samples.jpg", "training.png", "retrieval.jpg", "attention_val_nearest.jpg",
            "attention_own_files.jpg", "patch_pca.jpg"} <= figures and "training_demo_long.png" not in figures
    assert sorted(p.name for p in run.iterdir()) == ["features", "last.pth", "log.jsonl", "settings.json",
                                                     "teacher.pth", "train.lock"]   # no epoch files in the
    #                                                  demo profile; the lock file stays, emptied, after the run
    for split, rows in (("train", 2), ("val", 2), ("own", 3)):   # 1 + 1 of each class's 2; 2 + 1 own files
        assert np.load(run / "features" / split / "features.npy").shape == (rows, 192), split
    for note in (run / "features" / "source.json", run / "features" / "own" / "source.json"):
        source = json.loads(note.read_text())
        assert source["model"] == str(run / "teacher.pth") and source["run"] == str(run)
    assert json.loads((run / "features" / "source.json").read_text())["data"] == \
        f"data_root {folder_run['home']}/photos"


def test_a_folder_run_says_its_split_class_by_class(folder_run):
    assert "held out per class (val/all): bird 1/2, tree 1/2" in folder_run["printed"]
    assert "2 classes" in folder_run["printed"]


def test_the_python_lines_for_your_own_files_run(nb, tmp_path):
    import torch
    block = re.search(r"```python\n( *teacher_file, files, folder, out = .*?)\n *```", README, re.S).group(1)
    block = textwrap.dedent(block)
    first, rest = block.split("\n", 1)
    write_photos(tmp_path / "photos", classes=("a", "b"), per_class=2)
    torch.save(nb.vit_tiny(patch_size=16, img_size=64).state_dict(), tmp_path / "teacher.pth")
    files = [str(tmp_path / "photos" / "a" / "0.png"), str(tmp_path / "photos" / "b" / "1.jpg")]
    mine = f"teacher_file, files, folder, out = {str(tmp_path / 'teacher.pth')!r}, {files!r}, " \
           f"{str(tmp_path / 'photos')!r}, {str(tmp_path / 'out')!r}\n"
    done = subprocess.run([sys.executable, "-c", mine + rest], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "attention_mine.jpg").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "features_mine" / "classes.json").read_text()) == ["a", "b"]
    assert np.load(tmp_path / "out" / "features_mine" / "features.npy").shape == (4, 192)
