import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from gradient_meta import meta_rl
from gradient_meta.functional import meta_gradient
from gradient_meta.meta_rl import (
    KILL_ENV,
    MetaRLConfig,
    build_pool,
    check_resume,
    draw_tasks,
    load_state,
    meta_train,
    state_path,
)
from gradient_meta.policy import PolicyConfig, init_policy
from gradient_meta.rl import ObsNorm, Sampler, advantages, inner_loss, make_outer_loss, to_batch
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.suites import get_suite

TIMING = ("sample_s", "learn_s")


@pytest.fixture(scope="module")
def rl_batches():
    """Support and query episodes of 3 reach tasks, as meta-training builds them."""
    tasks = get_suite("ML1:reach-v3").tasks("train")[:3]
    params = init_policy(PolicyConfig(hidden=(16,)), torch.Generator().manual_seed(0))
    params = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in params.items()}
    sampler = Sampler(tasks, 12)
    g = torch.Generator().manual_seed(2)
    pre = sampler.sample(params, ObsNorm(), 2, g, per_task=False)
    support = to_batch(pre, advantages(pre, 0.99, 0.95))
    from gradient_meta.functional import adapt_tasks
    post = sampler.sample(adapt_tasks(inner_loss, params, support, 0.1), ObsNorm(), 1, g, per_task=True)
    sampler.close()
    return params, support, to_batch(post, advantages(post, 0.99, 0.95))


def _loop_meta_gradient(params, step, support, query, steps, outer):
    """The same meta-gradient with torch.autograd, one task at a time (create_graph through the inner step)."""
    p = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    a = {k: v.detach().double().requires_grad_() for k, v in step.items()} if isinstance(step, dict) else step
    total = 0.0
    n = support["obs"].shape[0]
    for i in range(n):
        s = {k: v[i].double() for k, v in support.items()}
        q = {k: v[i].double() for k, v in query.items()}
        phi = p
        for _ in range(steps):
            g = torch.autograd.grad(inner_loss(phi, s), list(phi.values()), create_graph=True)
            phi = {k: phi[k] - (a[k] if isinstance(a, dict) else a) * gk for k, gk in zip(phi, g)}
        total = total + outer(phi, q) / n
    leaves = list(p.values()) + (list(a.values()) if isinstance(a, dict) else [])
    grads = torch.autograd.grad(total, leaves)
    return dict(zip(p, grads[: len(p)])), (dict(zip(a, grads[len(p):])) if isinstance(a, dict) else None)


@pytest.mark.parametrize("steps,learned", [(1, False), (2, False), (1, True)])
def test_rl_meta_gradient_equals_a_per_task_autograd_loop(rl_batches, steps, learned):
    params, support, query = rl_batches
    check_against_loop(params, support, query, make_outer_loss(0.2, 0.01), steps, learned)


def check_against_loop(params, support, query, outer, steps, learned):
    """The vmapped meta-gradient (and step-size gradient) equals the per-task autograd loop, in float64."""
    step = {k: torch.full_like(v, 0.05) + 0.01 * torch.rand(v.shape) for k, v in params.items()} if learned else 0.05
    # float64 on both sides, so the comparison measures the maths, not rounding
    p64 = {k: v.double() for k, v in params.items()}
    s64 = {k: v.double() for k, v in step.items()} if learned else step
    sup = {k: v.double() for k, v in support.items()}
    qry = {k: v.double() for k, v in query.items()}
    got = meta_gradient(inner_loss, outer, p64, sup, qry, s64, steps, learn_step_size=learned, vectorise=True)
    want_p, want_a = _loop_meta_gradient(params, step, support, query, steps, outer)
    for k in params:
        torch.testing.assert_close(got.params[k], want_p[k], atol=1e-5, rtol=1e-5)
        if learned:
            torch.testing.assert_close(got.step_size[k], want_a[k], atol=1e-5, rtol=1e-5)
    assert max(float(v.abs().max()) for v in want_p.values()) > 1e-4  # not a vacuous match


def test_task_draws_are_reproducible_and_pools_avoid_test_tasks():
    cfg = MetaRLConfig(task_pool="7", meta_batch=4, episode_length=10)
    pool = build_pool(cfg)
    test = set(get_suite(cfg.suite).tasks("test"))
    assert len(pool) == 7 and not (set(pool) & test)
    assert draw_tasks(cfg, pool, 3) == draw_tasks(cfg, build_pool(cfg), 3)
    assert draw_tasks(cfg, pool, 3) != draw_tasks(cfg, pool, 4)
    fresh = MetaRLConfig(task_pool="fresh", meta_batch=3, episode_length=10)
    assert not (set(draw_tasks(fresh, None, 1)) & test)


@pytest.mark.parametrize("bad,match", [({"algo": "ppo"}, "algorithm"), ({"task_pool": "many"}, "task pool"),
                                       ({"meta_batch": 0}, "meta-batch"), ({"inner_lr": -1.0}, "inner-lr"),
                                       ({"suite": "ML2"}, "suite")])
def test_bad_settings_are_usage_errors(bad, match):
    with pytest.raises(UsageError, match=match):
        MetaRLConfig(**bad)


TINY = ["--meta-batch", "2", "--episode-length", "8", "--iterations", "5", "--checkpoint-every", "2",
        "--hidden", "8", "--ppo-epochs", "2"]


def _cli(out, algo, env=None):
    cmd = [sys.executable, "-m", "icl_metarl.study.cli", "train", algo, "--out", str(out), *TINY]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def _strip(log):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in log]


@pytest.mark.slow  # three subprocesses: ~60-90 s on the shared 2 cores
@pytest.mark.parametrize("algo", ["meta-sgd"])
def test_resume_after_sigkill_continues_the_same_run(tmp_path, algo):
    whole = _cli(tmp_path / "whole", algo)
    assert whole.returncode == 0, whole.stderr
    killed = _cli(tmp_path / "run", algo, {KILL_ENV: "3"})
    assert killed.returncode == -9  # SIGKILL after logging iteration 3, past the checkpoint of iteration 2
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [1, 2, 3]
    resumed = _cli(tmp_path / "run", algo)
    assert resumed.returncode == 0, resumed.stderr
    read = lambda d: [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["iteration"] for r in read(tmp_path / "run")] == [1, 2, 3, 4, 5]
    assert _strip(read(tmp_path / "run")) == _strip(read(tmp_path / "whole"))
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "whole" / "state.safetensors"), load_file(tmp_path / "run" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_extended_equals_a_longer_run(tmp_path):
    """Rerunning a finished run with more --iterations continues it: the same log, weights and budget counts
    as a run trained that long in one go; fewer iterations than it holds is a one-line error."""
    from safetensors.torch import load_file

    cfg = lambda n: MetaRLConfig(iterations=n, meta_batch=2, episode_length=6, hidden=(4,), checkpoint_every=2,  # noqa: E731
                                 algo="meta-sgd")
    whole = meta_train(cfg(4), tmp_path / "whole", progress=False)
    meta_train(cfg(2), tmp_path / "run", progress=False)
    extended = meta_train(cfg(4), tmp_path / "run", progress=False)
    assert _strip(extended) == _strip(whole)
    a, b = load_file(tmp_path / "whole" / "state.safetensors"), load_file(tmp_path / "run" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    budget = lambda d: {k: v for k, v in json.loads((d / "budget.json").read_text()).items()  # noqa: E731
                        if "minutes" not in k}
    assert budget(tmp_path / "run") == budget(tmp_path / "whole")
    assert (tmp_path / "run" / "snapshots" / "iteration-000002").is_dir()
    with pytest.raises(UsageError, match="already at iteration 4"):
        meta_train(cfg(3), tmp_path / "run", progress=False)


def test_resume_with_other_settings_is_refused(tmp_path):
    cfg = MetaRLConfig(iterations=1, meta_batch=2, episode_length=6, hidden=(4,), checkpoint_every=1)
    log = meta_train(cfg, tmp_path, progress=False)
    assert len(log) == 1
    with pytest.raises(UsageError, match="other settings"):
        meta_train(MetaRLConfig(iterations=2, meta_batch=2, episode_length=6, hidden=(4,), inner_lr=0.2),
                   tmp_path, progress=False)
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["model_type"] == "gradient_meta_rl"


# ------------------------------------------------------------------ Reptile plays what it learns from
@pytest.fixture
def played(monkeypatch):
    """Every sample meta-training takes, as (per_task, episodes, steps): a sampler that counts."""
    calls = []

    class Counting(meta_rl.Sampler):
        def sample(self, params, norm, episodes, generator, per_task, **kw):
            rollout = super().sample(params, norm, episodes, generator, per_task, **kw)
            calls.append((per_task, episodes, rollout.steps))
            return rollout

    monkeypatch.setattr(meta_rl, "Sampler", Counting)
    return calls


@pytest.mark.parametrize("algo", ["reptile", "maml"])
def test_the_env_step_budget_is_exactly_the_episodes_played(tmp_path, played, algo):
    """Reptile plays only the support episodes its inner loop learns from (no query episodes), and each
    iteration's budget counts exactly those; MAML, the control, plays its query episodes and counts them."""
    from icl_metarl.harness.budget import read_budget

    cfg = MetaRLConfig(algo=algo, iterations=2, meta_batch=2, adapt_episodes=2, episode_length=6, hidden=(4,),
                       ppo_epochs=1, checkpoint_every=1)
    log = meta_train(cfg, tmp_path, progress=False)
    support = (False, 2, 2 * 2 * 6)  # (not per task, 2 episodes, 2 tasks x 2 episodes x 6 steps)
    if algo == "reptile":
        assert played == [support, support]
        assert "success_post" not in log[0] and "return_post" not in log[0]
    else:
        assert played == [support, (True, 1, 2 * 6)] * 2
    budgets = [read_budget(tmp_path / "snapshots" / f"iteration-{i:06d}")["env_steps"] for i in (1, 2)]
    per_iteration = sum(steps for *_, steps in played) // 2
    assert budgets == [per_iteration, 2 * per_iteration] == [r["env_steps"] for r in log]
    assert read_budget(tmp_path)["env_steps"] == sum(steps for *_, steps in played)


# -------------------------------------------------------------- resuming a run of several processes
@pytest.mark.parametrize("ranks,world,want", [
    ([None], 1, None), ([None, None], 2, None), ([(4, 1)], 1, 4), ([(4, 2), (4, 2)], 2, 4),
    ([(4, 2)], 1, "was written by 2 process(es), this run has 1"),
    ([(4, 1), None], 2, "was written by 1 process(es), this run has 2"),
    ([(4, 2), (4, 2), None, None], 4, "was written by 2 process(es), this run has 4"),
    ([(4, 2), None], 2, "no state for rank(s) 1 of the 2 processes"),
    ([(4, 2), (2, 2)], 2, "hold different iterations (rank 0 at 4, rank 1 at 2)"),
])
def test_check_resume_needs_as_many_processes_at_one_iteration(tmp_path, ranks, world, want):
    if want is None or isinstance(want, int):
        assert check_resume(tmp_path, ranks, world) == want
        return
    with pytest.raises(UsageError) as e:
        check_resume(tmp_path, ranks, world)
    assert want in str(e.value) and "\n" not in str(e.value)


class Rank0Of:
    """Rank 0 of ``world`` processes, played in this one: ``gather`` adds what the other ranks would send
    (each (iteration, processes that wrote it), or (-1, -1) for no state)."""

    def __init__(self, world, others):
        self.num_processes, self.process_index, self.others = world, 0, others

    def gather(self, t):
        return torch.cat([t, torch.tensor(self.others, dtype=t.dtype).flatten()])

    def reduce(self, *_, **__):
        raise AssertionError("a mismatched resume must stop before any collective of the loop")


def _rewrite_meta(path, **changes):
    from safetensors.torch import save
    tensors, meta = load_state(path)
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    path.write_bytes(save(tensors, meta))


SMALL = MetaRLConfig(algo="reptile", iterations=2, meta_batch=2, episode_length=6, hidden=(4,), checkpoint_every=1)


def test_resume_refuses_another_number_of_processes_or_mismatched_iterations(tmp_path):
    meta_train(SMALL, tmp_path, progress=False)  # written by 1 process, at iteration 2
    assert load_state(tmp_path / "state.safetensors")[1]["num_processes"] == "1"
    bigger = dataclasses.replace(SMALL, iterations=3)
    with pytest.raises(UsageError, match=r"written by 1 process\(es\), this run has 2"):
        meta_train(bigger, tmp_path, accelerator=Rank0Of(2, [(-1, -1)]), progress=False)
    # the same state as if 2 processes had written it: refused by 1, and by 2 whose ranks disagree
    _rewrite_meta(state_path(tmp_path, 0), num_processes="2")
    with pytest.raises(UsageError, match=r"written by 2 process\(es\), this run has 1"):
        meta_train(bigger, tmp_path, progress=False)
    with pytest.raises(UsageError, match=r"different iterations \(rank 0 at 2, rank 1 at 1\)"):
        meta_train(bigger, tmp_path, accelerator=Rank0Of(2, [(1, 2)]), progress=False)
    # a state from before processes were counted: one per rank file, here 1; it resumes alone
    _rewrite_meta(state_path(tmp_path, 0), num_processes=None)
    assert [r["iteration"] for r in meta_train(bigger, tmp_path, progress=False)] == [1, 2, 3]


def _two_process_run(out, iterations):
    from accelerate import Accelerator
    meta_train(dataclasses.replace(SMALL, iterations=iterations), out, accelerator=Accelerator(cpu=True),
               progress=False)


@pytest.mark.slow  # two gloo processes with their own Meta-World environments
def test_a_run_of_two_processes_resumes_with_two_only(tmp_path):
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    # the forked processes would inherit a one-process state left by any earlier Accelerator of this pytest
    AcceleratorState._reset_state(reset_partial_state=True)
    debug_launcher(_two_process_run, args=(tmp_path, 2), num_processes=2)
    held = lambda: [load_state(state_path(tmp_path, r))[1] for r in (0, 1)]  # noqa: E731
    assert [(m["iteration"], m["num_processes"]) for m in held()] == [("2", "2")] * 2
    with pytest.raises(UsageError, match=r"written by 2 process\(es\), this run has 1"):
        meta_train(dataclasses.replace(SMALL, iterations=3), tmp_path, progress=False)
    debug_launcher(_two_process_run, args=(tmp_path, 3), num_processes=2)  # two processes extend it
    assert [(m["iteration"], m["num_processes"]) for m in held()] == [("3", "2")] * 2
    assert [r["iteration"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_the_logged_iteration_is_the_episodes_it_played(tmp_path, monkeypatch):
    """Each figure of a log row recomputed from the episodes meta-training played (recorded from its
    sampler): success and return of the first support and the last query episode, and the step count."""
    played = []
    sample = Sampler.sample

    def recording(self, *args, **kwargs):
        played.append(sample(self, *args, **kwargs))
        return played[-1]

    monkeypatch.setattr(Sampler, "sample", recording)
    cfg = MetaRLConfig(iterations=1, meta_batch=3, episode_length=6, hidden=(4,), adapt_episodes=2,
                       query_episodes=2)
    row = meta_train(cfg, tmp_path, progress=False)[0]
    pre, post = played  # support episodes of the initial policy, query episodes of the adapted ones

    def mean_over_tasks(rollout, episode: int, of: str) -> float:
        """Episode ``episode`` of every task: its success flag, or its rewards summed step by step."""
        per_task = [float(rollout.success[t, episode]) if of == "success"
                    else sum(float(r) for r in rollout.rew[t, episode]) for t in range(cfg.meta_batch)]
        return sum(per_task) / len(per_task)

    assert row["env_steps"] == cfg.meta_batch * (2 + 2) * cfg.episode_length
    assert row["success_pre"] == pytest.approx(mean_over_tasks(pre, 0, "success"), abs=1e-4)
    assert row["success_post"] == pytest.approx(mean_over_tasks(post, -1, "success"), abs=1e-4)
    assert row["return_pre"] == pytest.approx(mean_over_tasks(pre, 0, "return"), abs=1e-3)  # logged to 3 decimals
    assert row["return_post"] == pytest.approx(mean_over_tasks(post, -1, "return"), abs=1e-3)
    # each comparison can fail: the episodes it picks differ from the others beyond the tolerance
    returns = [mean_over_tasks(r, e, "return") for r in (pre, post) for e in (0, -1)]
    assert min(abs(a - b) for i, a in enumerate(returns) for b in returns[i + 1:]) > 1e-2
