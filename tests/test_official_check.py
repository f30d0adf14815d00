"""check_official_step.py refuses what it cannot run, naming it, before it loads anything (the official code
itself is not part of the project, so the comparison runs on demand: tests/benchmarks/results/)."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "check_official_step.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_a_folder_without_the_official_code_is_named(tmp_path):
    out = run("--official", str(tmp_path))
    assert out.returncode != 0 and f"--official {tmp_path}: no main_dino.py there" in out.stderr


def test_steps_outside_the_schedule_are_refused(tmp_path):
    (tmp_path / "main_dino.py").write_text("")
    for steps in ("0", "13"):
        out = run("--official", str(tmp_path), "--steps", steps)
        assert out.returncode != 0 and f"--steps {steps}: must be 1 to 12" in out.stderr
