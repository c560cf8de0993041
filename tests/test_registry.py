"""The learner registry and the layering it keeps: a learner is one module plus its registration; the
harness imports no learner; gradient_meta imports no in-context module; --help needs no torch."""

import json
import subprocess
import sys
import textwrap

import pytest

from icl_metarl.harness import registry
from icl_metarl.harness.errors import UsageError
from icl_metarl.study.cli import main

TOY = '''
"""A toy learner: one file, registered when imported; it learns the mean action of the expert."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from icl_metarl.harness.agent import Agent
from icl_metarl.harness.files import atomic_write_json, read_json
from icl_metarl.harness.registry import Learner, register


@dataclass
class ToyConfig:
    """Settings of the toy learner."""

    push: float = 0.5
    """the constant first action dimension it learns to play"""
    tag: str = "toy"
    """a label written into its checkpoint"""


class ToyAgent(Agent):
    name = "toy"

    def __init__(self, push, adaptive):
        self.push, self.adaptive = push, adaptive

    def start_trials(self, num_trials, seed):
        self.episodes = 0

    def act(self, obs):
        a = np.zeros((len(obs), 4), dtype=np.float32)
        a[:, 0] = self.push if (self.adaptive and self.episodes > 0) else 0.0
        return a

    def end_episode(self):
        self.episodes += 1


def train(config, out):
    atomic_write_json(Path(out) / "config.json", {"model_type": "toy_learner", "push": config.push, "tag": config.tag})


def load_agent(path, adaptive=True):
    return ToyAgent(read_json(Path(path) / "config.json")["push"], adaptive)


register(Learner(name="toy", summary="a toy learner for tests", config=ToyConfig, train="toy_learner:train",
                 load_agent="toy_learner:load_agent", model_type="toy_learner"))
'''


def test_a_learner_in_one_file_trains_and_evaluates_through_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "toy_learner.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ICL_METARL_LEARNERS", "toy_learner")
    ckpt, out = tmp_path / "ckpt", tmp_path / "eval"
    assert main(["train", "toy", "--out", str(ckpt), "--push", "0.7", "--tag", "mine"]) == 0
    assert json.loads((ckpt / "config.json").read_text()) == {"model_type": "toy_learner", "push": 0.7, "tag": "mine"}
    assert main(["evaluate", str(ckpt), "random", "--suite", "ML1:reach-v3", "--tasks", "2", "-K", "2", "-E", "0",
                 "--episode-length", "10", "--seeds", "0", "--non-adaptive", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["agents"]) == ["toy", "toy [non-adaptive]", "random"]
    assert results["agents"]["toy"]["description"]["type"] == "ToyAgent"
    # the adaptive toy pushes from episode 2 on and the non-adaptive never does: returns differ there only
    ret = {(r["agent"], r["task"], r["episode"]): r["return"] for r in results["records"]}
    assert ret[("toy", 0, 0)] == ret[("toy [non-adaptive]", 0, 0)]
    assert ret[("toy", 0, 1)] != ret[("toy [non-adaptive]", 0, 1)]
    assert "toy" in registry.discover()


def test_unknown_learner_module_and_name_are_one_line_errors(monkeypatch, capsys):
    monkeypatch.setenv("ICL_METARL_LEARNERS", "no_such_learner_module")
    assert main(["suites"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_learner_module" in err[0]
    monkeypatch.delenv("ICL_METARL_LEARNERS")
    with pytest.raises(UsageError, match="unknown learner 'ppo'; valid: .*icl.*maml"):
        registry.get("ppo")


def test_builtin_learners_are_registered_with_their_checkpoint_types():
    learners = registry.discover()
    assert {"icl", "maml", "meta-sgd", "reptile"} <= set(learners)
    assert learners["icl"].model_type == "icl_metarl_policy"
    assert {learners[a].model_type for a in ("maml", "meta-sgd", "reptile")} == {"gradient_meta_rl"}
    assert [learners[a].fixed for a in ("maml", "meta-sgd", "reptile")] == [{"algo": a} for a in ("maml", "meta-sgd",
                                                                                                  "reptile")]


def _modules_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_harness_imports_no_learner():
    loaded = _modules_after("import icl_metarl.harness.evaluation, icl_metarl.harness.report, "
                            "icl_metarl.harness.registry, icl_metarl.harness.rollout, icl_metarl.harness.mw_adapter")
    learners = [m for m in loaded if m.startswith(("icl_metarl.incontext", "icl_metarl.probes", "icl_metarl.study",
                                                   "gradient_meta"))]
    assert learners == []
    assert "icl_metarl.harness.rollout" in loaded  # the check can see a loaded module


def test_gradient_meta_imports_no_in_context_module():
    loaded = _modules_after("import gradient_meta.meta_rl, gradient_meta.rl_agent, gradient_meta.sinusoid, "
                            "gradient_meta.learner, icl_metarl.harness.evaluation")
    assert [m for m in loaded if m.startswith(("icl_metarl.incontext", "icl_metarl.probes", "icl_metarl.study"))] == []
    assert "gradient_meta.meta_rl" in loaded


COMMANDS = ["", "suites", "generate", "train", "train icl", "train maml", "train reptile", "pretrain", "meta-train",
            "evaluate", "compare", "curves", "crosscheck", "probe", "fewshot sinusoid", "fewshot sinusoid train",
            "fewshot sinusoid evaluate", "fewshot sinusoid table", "fewshot", "fewshot train", "fewshot evaluate",
            "fewshot probe", "quickstart"]


def test_help_answers_without_importing_torch():
    # one process for every command (each help adds what it imports; a fresh process per command cost 20 s)
    loaded = _modules_after(f"""
        import sys
        from icl_metarl.study.cli import main
        torch_after = []
        for command in {COMMANDS!r}:
            try:
                main(command.split() + ['--help'])
            except SystemExit as e:
                assert e.code == 0, command
            if 'torch' in sys.modules:
                torch_after.append(command)
        print(torch_after)
    """)
    assert "torch" not in loaded
    assert "icl_metarl.study.cli" in loaded


def test_a_generation_worker_imports_neither_torch_nor_transformers():
    """A spawned generation worker imports histories.py for its entry point: without torch (~5-10 s a worker)."""
    loaded = _modules_after("import icl_metarl.incontext.histories")
    assert not {"torch", "transformers", "accelerate"} & loaded
    assert "icl_metarl.incontext.recording" in loaded  # the check can see a loaded module
