"""The quickstart's ML1 settings: the committed table against the committed measurement, and the rule."""

from pathlib import Path

import pytest

from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import read_json
from icl_metarl.harness.suites import MEASURED_GOAL_OFFSETS, env_names
from icl_metarl.study.ml1_presets import (
    QUICKSTART_ML1,
    SUCCESS_BAR,
    ML1Preset,
    episode_length_for,
    presets_from,
    quickstart_preset,
    summarise,
)

MEASURED = Path(__file__).resolve().parents[1] / "results" / "expert-ml1" / "measured.json"


def test_table_is_the_one_the_measurement_gives():
    measured = read_json(MEASURED)
    assert set(measured["environments"]) == set(env_names())  # every ML1 environment was measured
    assert presets_from(measured) == QUICKSTART_ML1
    for env, entry in measured["environments"].items():  # the expert was measured as the quickstart runs it
        assert tuple(entry["expert_goal_offsets"]) == ((MEASURED_GOAL_OFFSETS[env],) if env in MEASURED_GOAL_OFFSETS
                                                       else ())


def test_rule():
    assert episode_length_for(41) == 50  # reach: p90 x 1.2 = 49.2, up to 50
    assert episode_length_for(57) == 70 and episode_length_for(25) == 50  # at least 50
    assert episode_length_for(450) == 500 and episode_length_for(None) == 500  # at most 500; no success: all


def test_summarise_one_evaluation():
    rec = lambda ok, s: {"agent": "oracle", "env_name": "push-v3", "success": ok, "steps_to_success": s}  # noqa: E731
    results = {"records": [rec(True, 10), rec(False, 0), rec(True, 30), rec(True, 20)],
               "agents": {"oracle": {"description": {"expert_goal_offsets": []}}}}
    m = summarise(results)
    assert m["tasks"] == 4 and m["success"] == 0.75 and m["steps_to_success"] == [10, None, 30, 20]
    assert (m["steps_to_success_median"], m["steps_to_success_p90"], m["steps_to_success_max"]) == (20, 28, 30)


def test_quickstart_preset():
    assert quickstart_preset("ML10") is None
    reach = quickstart_preset("ML1:reach-v3")
    assert reach == ML1Preset(50, reach.success, (MEASURED_GOAL_OFFSETS["reach-v3"],))
    below = next(e for e, p in QUICKSTART_ML1.items() if p.success < SUCCESS_BAR)
    with pytest.raises(UsageError, match=f"ML1:{below}: its scripted expert succeeds on {QUICKSTART_ML1[below].success:.2f}"):
        quickstart_preset(f"ML1:{below}")
