"""Load the `#| export` cells of dino_vit.ipynb into a module.

Tests, benchmarks and the multi-GPU launcher import the notebook's own code through this loader, so
what they run is what the notebook defines. `DINO_NOTEBOOK` points it at another notebook file.
`parse_overrides` reads the scripts' `--set key=value ...` Config overrides, `check_at_least` refuses a count
below its least value, and `machine` and `bench_header` name the machine and the run that each benchmark's figures
come from: one spelling for all of them.
"""
import ast
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPORT_MARK = "#| export"


def is_export(src):
    """Whether a code cell's source is a definitions cell (its first line `#| export`)."""
    return src.lstrip().startswith(EXPORT_MARK)


def notebook_cells(path):
    """The notebook's cells in order, each with its source as one string (the file may hold a list of lines)."""
    try:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot read notebook {path}: {e}") from e
    return [{**cell, "source": cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])}
            for cell in nb["cells"]]


def export_sources(path):
    """The source of every code cell whose first line is `#| export`, in notebook order."""
    return [cell["source"] for cell in notebook_cells(path)
            if cell["cell_type"] == "code" and is_export(cell["source"])]


def load_notebook(path=None, name="dino_vit"):
    """Execute the export cells in a fresh module registered as sys.modules[name] and return it."""
    path = Path(path or os.environ.get("DINO_NOTEBOOK") or ROOT / "dino_vit.ipynb")
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses and pickle look classes up here
    for i, src in enumerate(export_sources(path)):
        exec(compile(src, f"{path.name}[export {i}]", "exec"), module.__dict__)
    return module


def check_at_least(parser, args, **least):
    """The scripts' one-line refusal (parser.error: usage, the message, exit 2) of a count below its least
    value: check_at_least(p, a, steps=1, workers=0); a None (not given) passes."""
    for name, low in least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')}={value}: must be >= {low}")


def parse_overrides(pairs, config=None):
    """Config overrides from `--set key=value ...`: each value read as JSON (`false`, `null`, `[0.4, 1]`),
    else as a Python literal (`False`, `None`, `(0.4, 1)`), else kept as the plain string (`vit_small`); a
    field that the dataclass `config` declares a str keeps its text as it is (`run_name=123`)."""
    text_fields = {f.name for f in dataclasses.fields(config) if f.type in (str, "str")} if config else set()
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        if key == "profile":
            raise SystemExit(f"--set {pair}: the profile is an option of its own: --profile {value}")
        if key in out:
            raise SystemExit(f"--set gives {key} twice ({key}={out[key]!r} and {pair!r}): keep one")
        out[key] = value
        for read in (json.loads, ast.literal_eval) if key not in text_fields else ():
            try:
                out[key] = read(value)
                break
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):   # not that spelling
                continue
    return out


def cpu_model():
    """The CPU's model name (/proc/cpuinfo on Linux, else what the platform says)."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(device=None):
    """What a figure was measured on: the GPU's name for a CUDA device, else the CPU model with its cores and
    torch's threads; torch's version either way."""
    import torch
    if device is not None and torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads), "
            f"torch {torch.__version__}")


def bench_header(device=None):
    """The first line a benchmark prints: the date and time (UTC), the machine and the command as run, so that
    figures copied into tests/benchmarks/results/ say where, when and how they were measured."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    return f"# {now}, {machine(device)}, command: {command}"
