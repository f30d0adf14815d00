"""The notebook driven by hand, in real Jupyter kernels: each section runs in a fresh kernel after only
the Setup cells and the definitions (`#| export` cells) above it; settings changed in a live kernel never
mix runs; a cell that fails leaves the cells after it a clear error, not a stale object."""
import ast
import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from jupyter_client.manager import start_new_kernel

from nbloader import is_export, notebook_cells

ROOT = Path(__file__).resolve().parent.parent


def notebook_sections():
    """[(section title, [code sources])] in notebook order; a section starts at a level-2 heading."""
    sections = []
    for cell in notebook_cells(ROOT / "dino_vit.ipynb"):
        src = cell["source"]
        if cell["cell_type"] == "markdown" and src.startswith("## "):
            sections.append((src.splitlines()[0][3:].strip(), []))
        elif cell["cell_type"] == "code" and sections:
            sections[-1][1].append(src)
    return sections


SECTIONS = notebook_sections()
TITLES = [title for title, _ in SECTIONS]


class Kernel:
    """A real kernel, started in the repository root (as Jupyter and nbconvert start it: in the notebook's
    folder) or in `cwd`, that runs cells and reports errors and output."""

    def __init__(self, cwd=ROOT):
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(cwd))

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

    def interrupt(self, msg_id, timeout=600):
        """Jupyter's stop button while the cell sent as `msg_id` runs; the content of that cell's reply."""
        self.manager.interrupt_kernel()
        reply = self.client.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.client.get_shell_msg(timeout=timeout)
        return reply["content"]

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def wait_until(ready, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        time.sleep(0.05)


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """The embedded sample and its cache are built once for the module."""
    return tmp_path_factory.mktemp("data")


def small_overrides(shared, run_root, **extra):
    """The demo profile, smaller (a few steps), with every file it writes under temporary folders."""
    return dict(cache_dir=str(shared / "cache"), embedded_dir=str(shared / "embedded"),
                checkpoint_dir=str(run_root / "checkpoints"), figure_dir=str(run_root / "figures"),
                max_train_images=64, batch_size=16, max_eval_images=64, probe_epochs=5, **extra)


def start_with_setup(overrides, profile="demo"):
    """A fresh kernel with the Setup section run, `profile` and `overrides` set right after the parameters
    cell."""
    kernel = Kernel()
    setup = SECTIONS[0][1]
    for src in setup:
        kernel.run_ok(src)
        if src.startswith('profile = os.environ.get("DINO_PROFILE"'):
            kernel.run_ok(f"profile = {profile!r}\noverrides = {overrides!r}")
    return kernel


def run_definitions_above(kernel, title):
    for section, sources in SECTIONS[1:TITLES.index(title)]:
        for src in sources:
            if is_export(src):
                kernel.run_ok(src)


def run_section_alone(title, overrides, first=()):
    """A fresh kernel: Setup, the definitions above `title`, then every cell of the section (the cells in
    `first` right after the section's definitions, the others in order); then each of its checked cells
    (`# NBVAL_CHECK_OUTPUT`) once more, which must print what it printed (three drew from a generator or the
    global random state that the first run had moved on). Returns what the section's cells printed."""
    kernel = start_with_setup(overrides)
    try:
        run_definitions_above(kernel, title)
        sources = dict(SECTIONS)[title]
        definitions = [src for src in sources if is_export(src)]
        rest = [src for src in sources if src not in definitions and src not in first]
        printed = {src: kernel.run_ok(src) for src in definitions + list(first) + rest}
        for src, first_printed in printed.items():
            if src.startswith("# NBVAL_CHECK_OUTPUT"):
                assert kernel.run_ok(src) == first_printed, f"printed otherwise when run again:\n{src[:300]}"
    finally:
        kernel.close()
    return "".join(printed.values())


@pytest.mark.parametrize("title", [title for title in TITLES[1:] if title != "Training"])
def test_a_section_needs_only_the_definitions_above_it(title, shared_dirs, tmp_path):
    run_section_alone(title, small_overrides(shared_dirs, tmp_path))


def names_read(src):
    """The names a cell reads that it does not assign itself (in any scope: enough for these cells)."""
    names = [node for node in ast.walk(ast.parse(src)) if isinstance(node, ast.Name)]
    return ({n.id for n in names if isinstance(n.ctx, ast.Load)} - {n.id for n in names if isinstance(n.ctx, ast.Store)})


TRAIN_CELL = "= train_dino(cfg, train_set"
TRAINING = dict(SECTIONS)["Training"]
TRAIN_CELL_SOURCE = next(src for src in TRAINING if TRAIN_CELL in src)
# the cells after the train cell that do not show its run: the budget, the demo checkpoint's longer run,
# the switched-off runs
NOT_OF_THE_RUN = [src for src in TRAINING[TRAINING.index(TRAIN_CELL_SOURCE) + 1:]
                  if not is_export(src) and not names_read(src) & {"trainer", "history"}]


def training_overrides(shared, run_root):
    """small_overrides with 2 reader processes, as the GPU profiles read: the kill check's forked run and
    Jupyter's stop button must leave none of them behind (the killed run's readers kept its lock, so the
    resume was refused)."""
    return small_overrides(shared, run_root, num_workers=2)


@pytest.fixture(scope="module")
def training_section_run(shared_dirs, tmp_path_factory):
    """The Training section alone (as the test above), the cells after its train cell that do not show its
    run first, right after its definitions: with no train cell run, no earlier illustration; its run is
    also the straight run the interrupted one is compared with below."""
    root = tmp_path_factory.mktemp("straight")
    printed = run_section_alone("Training", training_overrides(shared_dirs, root), first=NOT_OF_THE_RUN)
    return dict(run=root / "checkpoints" / "demo", printed=printed)


def test_the_training_section_needs_only_the_definitions_above_it(training_section_run):
    assert (training_section_run["run"] / "teacher.pth").is_file()
    printed = training_section_run["printed"]   # its kill and damage checks, with reader processes
    assert "killed with SIGKILL after" in printed
    assert "largest difference between the two runs' states (networks, centres, AdamW, generators): 0" in printed
    assert "the run went on to step 4" in printed


def test_after_the_train_cell_only_the_cells_that_show_its_run_need_it(training_section_run):
    """The budget, the demo checkpoint's longer run and the switched-off runs read the train_set that only the
    Train cell made: before it, or in a fresh kernel, they failed with 'run the first code cell of its
    section', a schedule plot that does not make it. The section's run above ran them before its train cell."""
    assert not any(names_read(src) & {"train_set", "val_set"} for src in NOT_OF_THE_RUN)
    assert len(NOT_OF_THE_RUN) >= 4 and all(TRAINING.index(src) > TRAINING.index(TRAIN_CELL_SOURCE)
                                            for src in NOT_OF_THE_RUN)


def test_a_kernel_run_elsewhere_is_told_so_and_the_measured_curves_say_they_are_missing(tmp_path):
    """papermill runs the kernel in the folder it is called from (and a copy of the notebook alone runs in a
    folder without the project's files): there the settings cell names that folder, and the cell of the
    measured learning curves, which stopped such a run with a FileNotFoundError, says which files it misses;
    the notebook's own folder gets neither."""
    curve_cells = [src for src in TRAINING
                   if "learn-cpu-short16-val5k.json" in src or "plot_learning_curves(curves)" in src]
    assert len(curve_cells) == 2
    for folder in (tmp_path, ROOT):
        kernel = Kernel(cwd=folder)
        try:
            setup = "".join(kernel.run_ok(src) for src in SECTIONS[0][1])
            curves = "".join(kernel.run_ok(src) for src in curve_cells)
        finally:
            kernel.close()
        elsewhere = folder == tmp_path
        assert (f"note: the working folder {tmp_path.resolve()} holds neither" in setup) == elsewhere
        assert ("holds no learn-cpu-short16-val5k.json" in curves) == elsewhere
        assert ("short, seed 2: k-NN" in curves) != elsewhere


def section_cells(title, until=None):
    """The code cells of a section, up to and including the first one that contains `until`."""
    cells = []
    for src in dict(SECTIONS)[title]:
        cells.append(src)
        if until and until in src:
            return cells
    assert until is None, f"no cell of section {title!r} contains {until!r}"
    return cells


def start_training_kernel(overrides):
    """A fresh kernel with Setup, the definitions above Training and those of Training up to its train
    cell (not run: returned), so that a test decides how the train cell runs. The section's illustrations
    are left out: the section's own test runs them."""
    kernel = start_with_setup(overrides)
    run_definitions_above(kernel, "Training")
    *before, train_cell = section_cells("Training", until=TRAIN_CELL)
    for src in before:
        if is_export(src):
            kernel.run_ok(src)
    return kernel, train_cell


def teacher_tensors(run_dir):
    return torch.load(Path(run_dir) / "teacher.pth", map_location="cpu", weights_only=True)


def file_hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def interrupted_and_straight_runs(shared_dirs, tmp_path_factory, training_section_run):
    """The same small run twice: once straight through (the Training section's run), once interrupted
    (Jupyter's stop button) at its first logged step and then re-run. The interrupted kernel stays up
    for the tests below."""
    interrupted_root = tmp_path_factory.mktemp("interrupted")
    kernel, train_cell = start_training_kernel(training_overrides(shared_dirs, interrupted_root))
    log = interrupted_root / "checkpoints" / "demo" / "log.jsonl"
    msg_id = kernel.client.execute(train_cell)
    wait_until(lambda: log.exists() and log.read_text().count('"kind": "step"') >= 1)
    interrupted_at = kernel.interrupt(msg_id).get("evalue", "")
    resumed = kernel.run_ok(train_cell)
    yield dict(kernel=kernel, train_cell=train_cell, interrupted_at=interrupted_at, resumed=resumed,
               straight=training_section_run["run"], interrupted=interrupted_root / "checkpoints" / "demo",
               root=interrupted_root)
    kernel.close()


def test_an_interrupted_run_resumes_to_the_same_weights(interrupted_and_straight_runs):
    runs = interrupted_and_straight_runs
    assert "interrupted at step" in runs["interrupted_at"]
    assert "resuming from" in runs["resumed"]
    straight, resumed = teacher_tensors(runs["straight"]), teacher_tensors(runs["interrupted"])
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]
    read = lambda d: [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    assert strip(read(runs["straight"])) == strip(read(runs["interrupted"]))


def test_a_changed_batch_size_starts_a_new_run_and_leaves_the_old_one_untouched(interrupted_and_straight_runs):
    runs = interrupted_and_straight_runs
    kernel, old_dir = runs["kernel"], runs["interrupted"]
    before = file_hashes(old_dir)
    kernel.run_ok('cfg = make_config(profile, **{**overrides, "batch_size": 8})')
    printed = kernel.run_ok(runs["train_cell"])
    assert file_hashes(old_dir) == before
    new_dirs = [d for d in old_dir.parent.iterdir() if d.name.startswith("demo-")]
    assert len(new_dirs) == 1 and new_dirs[0].name in printed
    assert json.loads((new_dirs[0] / "settings.json").read_text())["batch_size"] == 8
    assert (new_dirs[0] / "teacher.pth").exists()
    kernel.run_ok("cfg = make_config(profile, **overrides)")


def test_a_refused_checkpoint_leaves_the_next_cell_a_clear_error(interrupted_and_straight_runs):
    kernel = interrupted_and_straight_runs["kernel"]
    run_definitions_above(kernel, "Evaluation")
    evaluation = section_cells("Evaluation")
    for src in evaluation:   # the section's own definitions too: the cells below need them
        if is_export(src):
            kernel.run_ok(src)
    load_cell = next(src for src in evaluation   # the cell that loads the teacher, not the one defining it
                     if "trained_teacher(cfg, device)" in src and not is_export(src))
    next_cell = next(src for src in evaluation[evaluation.index(load_cell) + 1:]
                     if "teacher_backbone" in src and not is_export(src))
    kernel.run_ok(load_cell)  # the demo checkpoint fits the demo profile
    kernel.run_ok('cfg = make_config(profile, **{**overrides, "arch": "vit_small"})')   # shows its own teacher
    kernel.run_ok('damaged = run_directory(cfg) / "teacher.pth"; damaged.parent.mkdir(parents=True, exist_ok=True); '
                  'damaged.write_bytes(b"\\xff\\xd8\\xff a JPEG, not a checkpoint")')
    error, _ = kernel.run(load_cell)
    assert error is not None and "teacher.pth is not a checkpoint: torch.save writes a zip archive, and this file " \
                                 "is a JPEG image" in error
    error, _ = kernel.run(next_cell)
    assert error is not None and "no teacher loaded" in error
    features_cell, table_cell = (next(src for src in evaluation
                                      if mark in src and not is_export(src))
                                 for mark in ("eval_features = {model_name", "eval_results, width"))
    error, _ = kernel.run(features_cell)   # no teacher: the table's cell is told, not given an empty table
    assert error is not None and "no teacher loaded" in error
    error, _ = kernel.run(table_cell)
    assert error is not None and "no features (the cell above) loaded" in error
    kernel.run_ok("damaged.unlink(); damaged.parent.rmdir(); cfg = make_config(profile, **overrides)")


def test_a_refused_setting_leaves_no_old_config_for_the_cells_below(interrupted_and_straight_runs):
    """The Setup cell refuses epochs=0; the training cell ran on the config from before, silently."""
    kernel, train_cell = interrupted_and_straight_runs["kernel"], interrupted_and_straight_runs["train_cell"]
    setup_cell = next(src for src in SECTIONS[0][1] if src.startswith("cfg = ") and "config_from_parameters(" in src)
    kernel.run_ok("good_overrides, overrides = overrides, {**overrides, 'epochs': 0}")
    error, _ = kernel.run(setup_cell)
    assert error is not None and error.startswith("ConfigError: Config.epochs=0")
    error, _ = kernel.run(train_cell)
    assert error is not None and "no config (Setup) loaded" in error
    long_run_cell = next(src for src in section_cells("Training") if src.startswith("long_log = Path(cfg."))
    error, _ = kernel.run(long_run_cell)   # it reads cfg without require: "'NoneType' object has no attribute"
    assert error is not None and "no config: run the settings cell (Setup) again" in error
    kernel.run_ok("overrides = good_overrides")
    kernel.run_ok(setup_cell)
    plot_cell = next(src for src in section_cells("Training") if src.startswith("fig = plot_training("))
    error, _ = kernel.run(plot_cell)   # new settings: no old run's history drawn under their run's name
    assert error is not None and "no training history loaded" in error


def test_an_interrupted_kill_check_leaves_no_process_behind(interrupted_and_straight_runs):
    """The kill check forks a training process; Jupyter's stop button while it waits left that child
    running on, then a zombie in the kernel."""
    import psutil
    kernel = interrupted_and_straight_runs["kernel"]
    kill_cell = next(src for src in section_cells("Training")
                     if "SIGKILL" in src and not is_export(src))
    kernel_process = psutil.Process(kernel.manager.provisioner.process.pid)
    children = lambda: {child.pid for child in kernel_process.children(recursive=True)}
    before = children()
    msg_id = kernel.client.execute(kill_cell)
    wait_until(lambda: children() - before, timeout=300)   # the forked run has started
    assert children() - before, "the kill check forked no process"
    assert kernel.interrupt(msg_id, timeout=300).get("ename") == "KeyboardInterrupt"
    assert children() == before
