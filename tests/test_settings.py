"""The one path from a settings dataclass to flags and to JSON sections (harness/settings.py)."""

import argparse
from dataclasses import dataclass, field

import pytest

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.settings import COUNT_OK, FLAGS, add_arguments, field_docs, from_args, from_dict


@dataclass
class Example:
    """A settings class with one field of every kind the helper supports."""

    steps: int = 10
    """optimizer steps"""
    rate: float = 0.5
    """a rate, 50% by default"""
    name: str = "run"
    """a label"""
    pool: str = field(default="fresh", metadata={COUNT_OK: True})
    """a task pool: a word or a count"""
    widths: tuple[int, ...] = (4, 4)
    """hidden widths"""
    limit: int | None = None
    """an optional bound"""
    on: bool = True
    """a switch"""
    episodes: int = field(default=3, metadata={FLAGS: ("-K",)})
    """episodes, also -K"""


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p, Example)
    return from_args(Example, p.parse_args(list(argv)))


def test_flags_come_from_the_fields():
    assert _parse() == Example()
    got = _parse("--steps", "3", "--rate", "0.1", "--widths", "8,16", "32", "--limit", "7", "--no-on", "-K", "5")
    assert got == Example(steps=3, rate=0.1, widths=(8, 16, 32), limit=7, on=False, episodes=5)
    assert _parse("--limit", "none").limit is None
    assert field_docs(Example)["rate"] == "a rate, 50% by default"


def test_help_renders_with_percent_signs():
    p = argparse.ArgumentParser()
    add_arguments(p, Example)
    assert "50% by default" in p.format_help()


def test_json_sections_are_checked_by_type():
    assert from_dict(Example, {"steps": 2, "widths": [1, 2], "pool": 200}, "s") == Example(steps=2, widths=(1, 2),
                                                                                           pool=200)
    for bad, words in (({"steps": "many"}, "s.steps must be a int"), ({"name": 5}, "s.name must be a str"),
                       ({"on": 1}, "s.on must be a bool"), ({"widths": 4}, "must be a list"),
                       ({"nope": 1}, "unknown setting in s: 'nope'")):
        with pytest.raises(UsageError, match=words):
            from_dict(Example, bad, "s")
    with pytest.raises(UsageError, match="s.name is set by the study"):
        from_dict(Example, {"name": "x"}, "s", owned=("name",))


def test_a_sequence_flag_whose_values_hold_commas_splits_at_spaces_only():
    from icl_metarl.incontext.config import GenerateConfig

    p = argparse.ArgumentParser()
    add_arguments(p, GenerateConfig)
    a = p.parse_args(["--expert-goal-offsets", "reach-v3=0,0,0.045", "push-v3=0,0,0.01", "--trials", "3"])
    assert from_args(GenerateConfig, a).expert_goal_offsets == ("reach-v3=0,0,0.045", "push-v3=0,0,0.01")
