"""gpu_checks.sh, the script a lent GPU session runs, driven here with a stand-in `python3` that records the
benchmarks it is asked to run (the benchmarks themselves need a GPU): which steps each PART runs, in which
order, and that GRAPHS skips the smoke test."""
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "benchmarks" / "gpu_checks.sh"
STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in *"--variants graphs --no-profile"*) [ "${SMOKE:-ok}" = ok ] && echo "graphs  vit_tiny  1234 images/s" ;; esac
case "$*" in *"${FAIL:-no such script}"*) echo "graphs: FAILED"; exit 3 ;; esac
case "$*" in *"${SEE_LOG:-no such script}"*) echo "epoch 1: a line"; sleep 1; cat "$OUT/learn.txt" > "$SEEN" ;; esac
"""

TIMEOUT_STAND_IN = """#!/usr/bin/env bash
echo "$1 ${3##*/}" >> "$LIMITS"
case "${3##*/}" in "${TIME_OUT:-none}") exit 124 ;; esac
shift
exec "$@"
"""


def run_checks(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_ins = {"python3": STAND_IN, "nvidia-smi": "#!/usr/bin/env bash\necho 'stand-in GPU'\n",
                 "timeout": TIMEOUT_STAND_IN}
    for name, text in stand_ins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
                               "OUT": str(tmp_path / "out"), "LIMITS": str(tmp_path / "limits.txt"), **env})
    first_words = [line.split()[0] for line in calls.read_text().splitlines()]   # a script, or -c
    scripts = [Path(word).name for word in first_words if word.endswith(".py")]
    return done, scripts


def test_all_runs_every_step_in_order(tmp_path):
    done, scripts = run_checks(tmp_path)
    assert done.returncode == 0, done.stderr
    assert scripts == ["bench_train.py", "check_graphs.py", "bench_learn.py", "bench_head_loss.py", "bench_train.py"]
    assert "CUDA graphs work: true" in done.stdout


@pytest.mark.parametrize("part, wanted", [
    ("learn", ["bench_train.py", "check_graphs.py", "bench_learn.py"]),
    ("speed", ["bench_train.py", "check_graphs.py", "bench_head_loss.py", "bench_train.py"]),
])
def test_each_part_runs_its_own_issue_only(tmp_path, part, wanted):
    done, scripts = run_checks(tmp_path, PART=part)
    assert done.returncode == 0, done.stderr
    assert scripts == wanted


def test_a_known_graphs_answer_skips_the_smoke_test(tmp_path):
    done, scripts = run_checks(tmp_path, PART="learn", GRAPHS="false")
    assert done.returncode == 0, done.stderr
    assert scripts == ["bench_learn.py"]
    assert "CUDA graphs work: false" in done.stdout
    assert (tmp_path / "calls.txt").read_text().strip().endswith("cuda_graphs=false")


@pytest.mark.parametrize("env, named", [({"PART": "both"}, "'both'"), ({"GRAPHS": "yes"}, "'yes'")])
def test_an_unknown_setting_is_refused_before_any_step(tmp_path, env, named):
    done, scripts = run_checks(tmp_path, **env)
    assert done.returncode == 2
    assert named in done.stderr and scripts == []


def limits(tmp_path):
    """{benchmark: the seconds `timeout` gave it}, the last call of each."""
    return {script: int(seconds) for seconds, script in
            (line.split() for line in (tmp_path / "limits.txt").read_text().splitlines())}


@pytest.mark.parametrize("part, graphs, deadline", [("speed", "", 300), ("learn", "true", 390), ("learn", "", 540),
                                                    ("all", "", 570)])
def test_each_part_keeps_to_its_share_of_a_15_minute_lease(tmp_path, part, graphs, deadline):
    """No step's limit passes its part's deadline (300 + 390 s and the machine's start fit 15 minutes), and in
    the learn part the steps before the learning run leave it its whole 390 s even when they use all theirs."""
    done, scripts = run_checks(tmp_path, PART=part, GRAPHS=graphs)
    assert done.returncode == 0, done.stderr
    given = limits(tmp_path)
    assert len(given) == len(set(scripts)) and max(given.values()) <= deadline
    if part == "learn":
        assert given["bench_learn.py"] >= 385 and sum(given.values()) <= deadline


def test_a_failed_or_timed_out_step_is_said_and_ends_the_script_with_status_1(tmp_path):
    """A crash or a timeout was lost in the pipe to tee: the script said 'done' and exited 0."""
    done, scripts = run_checks(tmp_path, FAIL="bench_head_loss.py", TIME_OUT="bench_learn.py")
    assert done.returncode == 1 and scripts[-1] == "bench_train.py"   # the steps after a failure still run
    assert "FAILED (exit 3): python3 tests/benchmarks/bench_head_loss.py" in done.stdout
    assert "FAILED (timed out after 390 s): python3 tests/benchmarks/bench_learn.py" in done.stdout
    assert done.stdout.strip().endswith("failed: learn.txt bench_head_loss.txt")


def test_a_failed_graph_check_turns_the_graphs_off(tmp_path):
    """check_graphs.py says FAILED and exits 1 when the graph step differs from the eager one: the learning
    run then goes without graphs, and the answer to pass on as GRAPHS is false."""
    done, scripts = run_checks(tmp_path, PART="learn", FAIL="check_graphs.py")
    assert done.returncode == 1 and scripts == ["bench_train.py", "check_graphs.py", "bench_learn.py"]
    assert "CUDA graphs work: false" in done.stdout
    assert (tmp_path / "calls.txt").read_text().strip().endswith("cuda_graphs=false")


def test_an_older_calls_smoke_log_is_not_this_calls_answer(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "smoke.txt").write_text("graphs  vit_tiny  1234 images/s\n")   # a passing call before
    done, scripts = run_checks(tmp_path, PART="learn", SMOKE="failed")
    assert scripts == ["bench_train.py", "bench_learn.py"] and "CUDA graphs work: false" in done.stdout


def test_a_step_that_cannot_fit_the_time_left_is_skipped_and_counted(tmp_path):
    """With 25 s left a step needing minutes was started anyway (and timed out), and a step skipped for time
    left the exit status 0, as if everything had been measured."""
    done, scripts = run_checks(tmp_path, PART="learn", GRAPHS="true", DEADLINE="100")
    assert done.returncode == 1 and scripts == []
    assert "skipped for time (" in done.stdout and "360 s needed): python3 tests/benchmarks/bench_learn.py" in done.stdout
    assert done.stdout.strip().endswith("failed: learn.txt (skipped)")


def test_a_steps_log_is_written_while_it_runs(tmp_path):
    """grep between the step and its log held the lines back until the step ended: a call killed at its limit
    brought back nothing of the step it was in."""
    done, _ = run_checks(tmp_path, PART="learn", GRAPHS="true", SEE_LOG="bench_learn.py", SEEN=str(tmp_path / "seen"))
    assert done.returncode == 0, done.stderr
    seen = (tmp_path / "seen").read_text().splitlines()
    assert seen[0].startswith("$ python3 tests/benchmarks/bench_learn.py") and seen[1:] == ["epoch 1: a line"]


@pytest.mark.parametrize("script, args, says", [
    ("bench_train.py", ["--steps", "0"], "--steps=0: must be >= 1"),
    ("check_graphs.py", ["--steps", "0"], "--steps=0: must be >= 1"),
    ("bench_learn.py", ["--name", "x", "--bank", "0"], "--bank=0: must be >= 1")])
def test_the_scripts_it_runs_refuse_a_bad_count_in_one_line(script, args, says):
    """bench_train.py called check_at_least without importing it: every run of it, the GPU call's included,
    ended in a NameError before measuring anything (the stand-in python3 above never runs it)."""
    import sys
    done = subprocess.run([sys.executable, str(SCRIPT.parent / script), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr


def test_a_benchmark_starts_with_the_date_the_machine_and_the_command():
    """The figures of bench_knn, bench_data and bench_head_loss named no machine and no date: whoever copied
    them into results/ had to type both in, and the GPU call's logs would have lacked them."""
    import re
    import sys
    script = SCRIPT.parent / "bench_head_loss.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--batch", "2", "--out-dim", "64",
                           "--steps", "1"], capture_output=True, text=True, timeout=120, cwd=SCRIPT.parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    first = done.stdout.splitlines()[0]
    assert re.fullmatch(r"# \d{4}-\d\d-\d\d \d\d:\d\d UTC, .+ \(\d+ cores, \d+ threads\), torch \S+, command: python "
                        r"tests/benchmarks/bench_head_loss\.py --device cpu --batch 2 --out-dim 64 --steps 1", first)


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPT.parent.glob("*.py") if p.name != "run_all.py"))
def test_every_benchmark_prints_that_line(script):
    """run_all.py only runs the others; each of them prints its figures after nbloader's bench_header."""
    source = (SCRIPT.parent / script).read_text()
    assert "print(bench_header(" in source and "from nbloader import bench_header" in source
