import pytest
from conftest import run_cli


def test_suites_lists_and_shows():
    out = run_cli("suites")
    assert out.returncode == 0, out.stderr
    assert "ML10" in out.stdout and "drawer-open-v3" in out.stdout and "reach-v3" in out.stdout
    one = run_cli("suites", "ML1:reach-v3")
    assert one.returncode == 0 and "test: 50 tasks" in one.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["suites", "ML11"], "'ML11'"),
        (["suites", "ML1:nope-v3"], "'nope-v3'"),
        (["suites", "ML1:reach-v3", "--split", "val"], "'val'"),
        (["suites", "ML1:reach-v3", "--check", "1", "--episode-length", "-5"], "-5"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert fragment in lines[0]
    assert "valid" in lines[0] or "positive" in lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["generate", "pretrain", "evaluate", "compare", "curves", "crosscheck", "probe",
                                     "meta-train", "quickstart"])
def test_every_help_renders(command):
    # argparse formats help with %: a stray '%' in a docstring once printed the option's internals.
    out = run_cli(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "option_strings" not in out.stdout and "Traceback" not in out.stderr


def test_crosscheck_plays_our_evaluator_and_metaworlds_on_the_same_tasks(capsys):
    from icl_metarl.study.cli import main
    assert main(["crosscheck", "oracle", "--tasks", "2", "-K", "1", "-E", "1", "--episode-length", "150"]) == 0
    out = capsys.readouterr().out
    assert "ML1:reach-v3 test, 2 tasks, K=1 E=1, episodes of 150 steps, seed 0" in out
    assert "oracle: ours 1.000 (2 episodes" in out and "Meta-World, one task per call 1.000" in out
    assert "per-task agreement (same success count of 1): 2/2" in out
    assert "difference +0.000 +- 0.000 (95%, paired by task)" in out  # the statistics module's paired interval
