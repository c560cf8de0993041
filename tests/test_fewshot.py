"""Few-shot regression: task families, reference solvers, the in-context regressor, the one evaluator
(same tasks and points for every learner), the gradient-descent probe, and the command end to end."""

import json

import pytest
import torch

from gradient_meta import sinusoid
from icl_metarl.fewshot import evaluation, solvers
from icl_metarl.fewshot.config import FewShotProbeConfig, FewShotTrainConfig
from icl_metarl.fewshot.evaluation import (
    FunctionPredictor,
    GradientPredictor,
    MismatchError,
    check_same_inputs,
    load_run,
    make_test_set,
    nearest_shots,
    reference_predictors,
    score,
    training_shots,
    write_report,
)
from icl_metarl.fewshot.model import ICLRegressor, ICLRegressorConfig, LinearSelfAttention
from icl_metarl.fewshot.probe import gd_predictions, linear_reference, probe_predictor
from icl_metarl.fewshot.train import complete_checkpoints, gradient_config, sample_batch, train_regressor
from icl_metarl.harness.errors import UsageError
from icl_metarl.harness.files import read_log
from icl_metarl.harness.regression_tasks import FAMILIES, LINEAR, MAML_SINE, get_family, shifted_families
from icl_metarl.study.cli import main

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ families
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_sampling_is_deterministic_per_seed(name):
    family = get_family(name)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        tasks = family.sample_tasks(6, g)
        return [*tasks.values(), *family.sample_points(tasks, 4, g)]

    a, b, c = draw(3), draw(3), draw(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert a[-2].shape == (6, 4, family.x_dim) and a[-1].shape == (6, 4, 1)


def test_maml_family_is_the_stream_gradient_meta_always_drew():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    amp, phase = sinusoid.sample_tasks(30, g1)
    x1, y1 = sinusoid.sample_points(amp, phase, 7, g1)
    tasks = MAML_SINE.sample_tasks(30, g2)
    x2, y2 = MAML_SINE.sample_points(tasks, 7, g2)
    assert torch.equal(amp, tasks["amplitude"]) and torch.equal(x1, x2) and torch.equal(y1, y2)
    torch.testing.assert_close(y1[:, :, 0], amp[:, None] * torch.sin(x1[:, :, 0] - phase[:, None]))


def test_families_follow_their_ranges():
    g = torch.Generator().manual_seed(0)
    msgd = get_family("metasgd-sine")
    tasks = msgd.sample_tasks(2000, g)
    f = tasks["frequency"]
    assert f.min() >= msgd.frequency[0] and f.max() <= msgd.frequency[1] and f.std() > 0.05
    x, _ = get_family("maml-sine-far-x").sample_points(MAML_SINE.sample_tasks(50, g), 20, g)
    assert x.min() >= 5.0 and x.max() <= 10.0
    tasks = LINEAR.sample_tasks(400, g)
    x, y = LINEAR.sample_points(tasks, 50, g)
    residual = y - LINEAR.function(tasks, x)
    assert residual.std().item() == pytest.approx(LINEAR.noise_std, rel=0.05)
    torch.testing.assert_close(LINEAR.function(tasks, x)[3, :, 0], x[3] @ tasks["w"][3])
    assert set(shifted_families("linear")) == {"linear-far-x", "linear-wide-w", "linear-noisy"}


def test_bad_input_is_one_line_error_naming_the_valid_values(tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown task family 'sine'; valid: maml-sine, metasgd-sine, linear"):
        get_family("sine")
    with pytest.raises(UsageError, match="unknown learner 'mamll'"):
        FewShotTrainConfig(learners=("mamll",))
    with pytest.raises(UsageError, match="unknown reference"):
        FewShotProbeConfig(reference="newton")
    assert main(["fewshot", "train", "--family", "sine", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task family 'sine'; valid: maml-sine" in err[0]
    assert main(["fewshot", "evaluate", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a few-shot run directory" in err[0]


# ------------------------------------------------------------------------------------- solvers
def test_least_squares_matches_the_closed_form():
    g = torch.Generator().manual_seed(1)
    x, y, xq = torch.randn(4, 12, 3, generator=g), torch.randn(4, 12, 1, generator=g), torch.randn(4, 5, 3, generator=g)
    xd, yd = x.double(), y.double()
    w = torch.linalg.solve(xd.transpose(1, 2) @ xd, xd.transpose(1, 2) @ yd)  # normal equations, K >= d
    torch.testing.assert_close(solvers.least_squares(x, y, xq), (xq.double() @ w)[..., 0].float())
    few = x[:, :2]  # K < d: the minimum-norm solution X^T (X X^T)^-1 y
    w = few.double().transpose(1, 2) @ torch.linalg.solve(few.double() @ few.double().transpose(1, 2), yd[:, :2])
    torch.testing.assert_close(solvers.least_squares(few, y[:, :2], xq), (xq.double() @ w)[..., 0].float())
    lam = 0.7
    w = torch.linalg.solve(xd.transpose(1, 2) @ xd + lam * torch.eye(3, dtype=torch.float64), xd.transpose(1, 2) @ yd)
    torch.testing.assert_close(solvers.ridge(x, y, xq, lam), (xq.double() @ w)[..., 0].float())


def test_kernel_and_neighbour_solvers_interpolate_the_support():
    g = torch.Generator().manual_seed(2)
    x = torch.linspace(-5, 5, 6)[torch.randperm(6, generator=g)].reshape(1, 6, 1).expand(3, 6, 1)
    y = torch.randn(3, 6, 1, generator=g)
    torch.testing.assert_close(solvers.nearest_neighbours(x, y, x, 1), y[..., 0])
    torch.testing.assert_close(solvers.gaussian_process(x, y, x, 1.0, 4.0, 1e-8), y[..., 0], atol=1e-5, rtol=0)
    far = torch.full((3, 1, 1), 50.0)  # far from every support point: the prior mean, 0
    torch.testing.assert_close(solvers.gaussian_process(x, y, far, 1.0, 4.0, 1e-8), torch.zeros(3, 1))
    torch.testing.assert_close(solvers.nearest_neighbours(x, y, far, 6), y[..., 0].mean(1, keepdim=True))


# ------------------------------------------------------------------------------ the evaluator
class Spy:
    """A learner that records what it was handed and predicts the mean support target."""

    def __init__(self, name, scribble=False):
        self.name, self.seen, self.scribble = name, {}, scribble

    def predict(self, sx, sy, qx):
        self.seen[sx.shape[1]] = (sx.clone(), sy.clone(), qx.clone())
        out = sy.mean(1).expand(-1, qx.shape[1]).clone()
        if self.scribble:  # a careless learner that writes into its inputs
            sx.add_(1.0), sy.mul_(-1.0), qx.zero_()
        return out


def test_every_learner_scores_the_same_tasks_and_points():
    test = make_test_set(LINEAR, n_tasks=5, max_shots=8, n_query=4, seed=0)
    spies = [Spy("a"), Spy("scribbler", scribble=True), Spy("b")]
    records = score([*spies, *reference_predictors(LINEAR)], test, shots=(1, 3, 8))
    for k in (1, 3, 8):
        expected = test.inputs(k)
        for spy in spies:
            assert all(torch.equal(s, e) for s, e in zip(spy.seen[k], expected))
        assert len({r["inputs"] for r in records if r["shots"] == k}) == 1
    assert {r["learner"] for r in records} == {"a", "scribbler", "b", "least squares", "ridge (Bayes)"}


def test_a_learner_fed_other_points_is_caught(monkeypatch, tmp_path):
    test = make_test_set(MAML_SINE, n_tasks=4, max_shots=5, n_query=3, seed=0)
    calls = {"n": 0}
    original = evaluation.TestSet.inputs

    def drifting(self, shots):  # an evaluator bug: the second learner gets freshly drawn points
        calls["n"] += 1
        sx, sy, qx = original(self, shots)
        return (sx + 0.1, sy, qx) if calls["n"] > 2 else (sx, sy, qx)

    monkeypatch.setattr(evaluation.TestSet, "inputs", drifting)
    with pytest.raises(MismatchError, match="'second' and 'first' were scored on different points"):
        score([Spy("first"), Spy("second")], test, shots=(2, 5))
    monkeypatch.setattr(evaluation.TestSet, "inputs", original)
    # results of two test sets cannot be merged into one report
    a = score([Spy("first")], test, shots=(2,))
    b = score([Spy("second")], make_test_set(MAML_SINE, 4, 5, 3, seed=1), shots=(2,))
    with pytest.raises(MismatchError):
        check_same_inputs(a + b)
    with pytest.raises(MismatchError):
        write_report({"records": a + b}, tmp_path)


def test_a_diverging_learner_is_reported_as_such(tmp_path):
    test = make_test_set(MAML_SINE, n_tasks=4, max_shots=2, n_query=3, seed=0)

    def nan_on_task_0(sx, sy, qx):
        out = torch.zeros(qx.shape[:2])
        out[0] = float("nan")
        return out

    records = score([FunctionPredictor("unstable", nan_on_task_0)], test, shots=(2,))
    assert records[0]["nonfinite_tasks"] == 1
    results = {"run": "r", "trained_on": "maml-sine", "families": ["maml-sine"], "budgets": {},
               "training_shots": {"gradient": 2, "in-context": 2}, "records": records, "versions": {},
               "settings": {"tasks": 4, "queries": 3, "seed": 0, "shots": [2], "extra_steps": [10]}}
    assert "diverged on 1/4 tasks" in write_report(results, tmp_path).read_text()


def test_gradient_learner_scores_as_gradient_meta_evaluates():
    torch.manual_seed(0)
    net = sinusoid.SineNet()
    params = {k: v.detach() for k, v in net.named_parameters()}
    ours = score([GradientPredictor("maml", net, params, 0.05, 1)], make_test_set(MAML_SINE, 20, 5, 30, seed=7), (5,))
    theirs = sinusoid.evaluate(net, params, 0.05, shots=5, steps=1, n_tasks=20, n_query=30, seed=7)
    assert ours[0]["mse"] == pytest.approx(theirs["mse"], rel=1e-5)
    assert ours[0]["ci95"] == pytest.approx(theirs["ci95"], rel=1e-4)


# -------------------------------------------------------------------------------------- fairness
@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_gradient_learners_meta_train_over_the_regressors_shot_range(algo, monkeypatch):
    """The support sizes a gradient learner's meta-updates see are the shot counts the in-context regressor's
    batches draw: 1..max_shots; its query sets keep max_shots points."""
    config = _small_config(family="maml-sine", max_shots=4, iterations=60, meta_batch=2)
    seen = []
    build = sinusoid.BUILDERS[algo]

    def spying(cfg, model, accelerator):
        learner = build(cfg, model, accelerator)
        step = learner.step

        def recording(support, query):
            seen.append((support[0].shape[1], query[0].shape[1]))  # (K, query points) of a meta-update
            return step(support, query)

        learner.step = recording
        return learner

    monkeypatch.setitem(sinusoid.BUILDERS, algo, spying)
    sinusoid.train(gradient_config(config, algo), log=lambda m: None)
    regressor = sample_batch(get_family(config.family), 64, config.max_shots, 16, torch.Generator().manual_seed(0))[4]
    assert {k for k, _ in seen} == set(regressor.unique().tolist()) == {1, 2, 3, 4}
    assert {q for _, q in seen} == {config.max_shots}


def test_a_study_refuses_reptile_with_one_step():
    with pytest.raises(UsageError, match="reptile needs inner steps >= 2, got 1"):
        _small_config(reptile_inner_steps=1)


def test_gradient_learners_are_scored_at_the_steps_they_trained_with_and_other_counts_are_labelled(tmp_path):
    for algo, steps in (("maml", 2), ("reptile", 3)):
        cfg = sinusoid.SinusoidConfig(algo=algo, inner_steps=steps, iterations=1, meta_batch=2, hidden=4, log_every=0)
        _, learner, _ = sinusoid.train(cfg, log=lambda m: None)
        sinusoid.save(tmp_path / algo, cfg, learner, 0.0)
    predictors, budgets = load_run(tmp_path, extra_steps=(0, 2, 10))
    assert [(p.name, p.steps) for p in predictors] == [
        ("maml (2 steps)", 2), ("maml (0 steps, trained with 2)", 0), ("maml (10 steps, trained with 2)", 10),
        ("reptile (3 steps)", 3), ("reptile (0 steps, trained with 3)", 0), ("reptile (2 steps, trained with 3)", 2),
        ("reptile (10 steps, trained with 3)", 10)]
    # the trained count, read a second way: the checkpoint's own config.json
    trained = {a: json.loads((tmp_path / a / "config.json").read_text())["config"]["inner_steps"]
               for a in ("maml", "reptile")}
    assert [p.steps for p in predictors if "trained with" not in p.name] == [trained["maml"], trained["reptile"]]
    assert set(budgets) == {p.name for p in predictors}


def test_training_shots_and_the_shot_count_the_ood_table_uses():
    assert training_shots({"max_shots": 20}) == {"gradient": [1, 20], "in-context": [1, 20]}
    assert training_shots({"max_shots": 20, "shots": 10}) == {"gradient": [10, 10], "in-context": [1, 20]}  # old runs
    evaluated = [1, 2, 5, 10, 20, 40]
    assert nearest_shots(evaluated, [1, 20]) == 20  # the largest inside the range
    assert nearest_shots([30, 40], [1, 20]) == 30 and nearest_shots([1, 2, 8], [1, 4]) == 2
    assert nearest_shots(evaluated, 10) == 10 and nearest_shots([2, 4], 3) == 2  # one K: nearest, smaller on a tie


# ------------------------------------------------------------------------- the regressor model
def _tiny(x_dim=1, attn="sdpa"):
    torch.manual_seed(0)
    return ICLRegressor(ICLRegressorConfig(x_dim=x_dim, d_model=16, n_layer=2, n_head=2, max_shots=6,
                                           attn_implementation=attn)).eval()


def test_a_query_reads_its_support_points_and_no_other_query():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    sx, sy, qx = torch.randn(2, 6, 1, generator=g), torch.randn(2, 6, generator=g), torch.randn(2, 3, 1, generator=g)
    base = model(sx, sy, qx, shots=4).prediction
    qx2 = qx.clone()
    qx2[:, 1] += 3.0
    changed = model(sx, sy, qx2, shots=4).prediction
    torch.testing.assert_close(changed[:, [0, 2]], base[:, [0, 2]])  # other queries untouched
    assert not torch.allclose(changed[:, 1], base[:, 1])
    sy2 = sy.clone()
    sy2[:, 4:] += 5.0  # support points beyond the 4 shots are invisible
    torch.testing.assert_close(model(sx, sy2, qx, shots=4).prediction, base)
    assert not torch.allclose(model(sx, sy2, qx).prediction, model(sx, sy, qx).prediction)
    eager = _tiny(attn="eager")
    torch.testing.assert_close(eager(sx, sy, qx, shots=4).prediction, base, atol=1e-5, rtol=1e-5)


def test_regressor_round_trips_through_safetensors_and_json(tmp_path):
    model = _tiny(x_dim=3)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = ICLRegressor.from_pretrained(tmp_path)
    x, y, q = torch.randn(2, 4, 3), torch.randn(2, 4), torch.randn(2, 5, 3)
    torch.testing.assert_close(loaded.predict(x, y, q), model.predict(x, y, q))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "other"}))
    with pytest.raises(UsageError, match="not the config of an in-context regressor"):
        ICLRegressor.from_pretrained(tmp_path)


def _small_config(**changes):
    base = dict(family="linear", max_shots=6, icl_steps=6, icl_batch=4, icl_queries=3, d_model=16, n_layer=1,
                n_head=2, checkpoint_every=3)
    return FewShotTrainConfig(**{**base, **changes})


def test_regressor_training_resumes_to_the_same_weights(tmp_path):
    whole = train_regressor(_small_config(), tmp_path / "whole", log=lambda m: None)
    train_regressor(_small_config(icl_steps=3), tmp_path / "split", log=lambda m: None)
    with pytest.raises(UsageError, match="already holds checkpoints; pass --resume"):
        train_regressor(_small_config(), tmp_path / "split", log=lambda m: None)
    with open(tmp_path / "split" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a kill cut the next record short
    resumed = train_regressor(_small_config(resume=True), tmp_path / "split", log=lambda m: None)
    steps = lambda run: [r["step"] for r in read_log(tmp_path / run / "log.jsonl")]  # noqa: E731
    assert steps("split") == steps("whole") and steps("whole")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert [p.name for p in complete_checkpoints(tmp_path / "split")] == ["step-00000003", "step-00000006"]
    assert not list((tmp_path / "split").rglob("*.bin")) and not list((tmp_path / "split").rglob("*.pt"))


# ------------------------------------------------------------------------------------- the probe
def test_a_linear_attention_layer_built_by_hand_is_one_gradient_step():
    d, lr = 4, 0.3
    layer = LinearSelfAttention.gradient_step(d, lr)
    g = torch.Generator().manual_seed(0)
    sx, sy, qx = torch.randn(5, 7, d, generator=g), torch.randn(5, 7, 1, generator=g), torch.randn(5, 3, d, generator=g)
    closed_form = torch.einsum("tk,tkd,tqd->tq", sy[..., 0], sx, qx) * lr / 7  # w1 = lr/K sum_j y_j x_j
    gd = gd_predictions(linear_reference(d), lr, sx, sy, qx, steps=[1])
    torch.testing.assert_close(layer.predict(sx, sy, qx), closed_form)
    torch.testing.assert_close(gd[:, 0], closed_form, atol=1e-5, rtol=1e-5)


def test_the_probe_ranks_one_gradient_step_first_for_that_layer_and_two_for_two_steps():
    family = get_family("linear")
    config = FewShotProbeConfig(shots=(3, 10), tasks=8, queries=5, gd_steps=(1, 2, 4), step_sizes=(0.1, 0.3, 1.0))
    result = probe_predictor(LinearSelfAttention.gradient_step(family.dim, 0.3).predict, family,
                             linear_reference(family.dim), config)
    for k, entry in result["shots"].items():
        assert entry["ranking"][0] == 1, (k, entry)
        top = entry["rows"][0]
        assert top["gd_steps"] == 1 and top["step_size_scale"] == 0.3
        assert top["relative_error"] < 1e-10 and top["sensitivity_cosine"] > 1 - 1e-6
        assert top["prediction_cosine"] > 1 - 1e-6 and entry["rows"][1]["relative_error"] > 1e-6
    # control: a predictor that IS two gradient steps is reported as two
    ref, two = linear_reference(family.dim), _two_step_predictor(family.dim, 0.3)
    inputs = make_test_set(family, 3, 4, 2, seed=0).inputs(4)
    torch.testing.assert_close(two(*inputs), gd_predictions(ref, 0.3, *inputs, steps=[2])[:, 0])
    result = probe_predictor(two, family, ref, config)
    assert all(entry["ranking"][0] == 2 for entry in result["shots"].values())


def _two_step_predictor(d, lr):
    """Two GD steps from w = 0 on (1/2K) sum (w.x - y)^2, written out (differentiable in y)."""
    def predict(sx, sy, qx):
        y, k = sy.reshape(*sy.shape[:2], 1), sx.shape[1]
        w = lr / k * sx.transpose(1, 2) @ y  # (T, d, 1)
        w = w - lr / k * sx.transpose(1, 2) @ (sx @ w - y)
        return (qx @ w)[..., 0]
    return predict


# ----------------------------------------------------------------------------------- end to end
def test_tiny_train_evaluate_probe_through_the_command_line(tmp_path, capsys):
    run, ev, pr = tmp_path / "run", tmp_path / "eval", tmp_path / "probe"
    assert main(["fewshot", "train", "--family", "maml-sine", "--out", str(run), "--iterations", "4", "--meta-batch",
                 "2", "--icl-steps", "4", "--icl-batch", "2", "--max-shots", "4", "--d-model", "8",
                 "--n-layer", "1", "--n-head", "2", "--learners", "icl", "maml", "meta-sgd", "reptile",
                 "pretrain"]) == 0
    assert main(["fewshot", "evaluate", str(run), "--out", str(ev), "--tasks", "3", "--queries", "4", "--shots", "1",
                 "2", "8", "--extra-steps", "3", "--shifted"]) == 0
    results = json.loads((ev / "results.json").read_text())
    learners = {r["learner"] for r in results["records"]}
    # each gradient learner at the steps it meta-trained with (Reptile's default k = 5), and 3 steps beside
    assert learners == {"in-context", "maml (1 step)", "maml (3 steps, trained with 1)", "meta-sgd (1 step)",
                        "meta-sgd (3 steps, trained with 1)", "reptile (5 steps)", "reptile (3 steps, trained with 5)",
                        "pretrain (1 step)", "pretrain (3 steps, trained with 1)", "3-NN", "GP (RBF, l=1)"}
    assert results["training_shots"] == {"gradient": [1, 4], "in-context": [1, 4]}
    assert results["families"] == ["maml-sine", *shifted_families("maml-sine")]
    for family in results["families"]:
        for k in (1, 2, 8):
            group = [r for r in results["records"] if r["family"] == family and r["shots"] == k]
            assert len(group) == len(learners) and len({r["inputs"] for r in group}) == 1
    report = (ev / "report.md").read_text()
    assert "## maml-sine-far-x" in report and "Out of distribution at K=2" in report  # the largest K in 1..4
    assert "Every learner trained on 1..4 support points" in report
    assert (ev / "mse-maml-sine.png").stat().st_size > 1000
    assert main(["fewshot", "probe", str(run), "--out", str(pr), "--tasks", "2", "--queries", "2", "--shots", "2",
                 "3", "--gd-steps", "1", "2", "--step-sizes", "0.5", "1"]) == 0
    metrics = json.loads((pr / "metrics.json").read_text())
    assert metrics["reference"].startswith("maml") and sorted(metrics["shots"]) == ["2", "3"]
    assert len(metrics["shots"]["3"]["attention"]["position_share"]) == 1  # one layer
    assert (pr / "probe.md").is_file() and (pr / "gd_similarity.png").is_file()
    # a second train command finishes nothing new and says so; other settings are refused
    assert main(["fewshot", "train", "--family", "maml-sine", "--out", str(run), "--iterations", "4", "--meta-batch",
                 "2", "--icl-steps", "4", "--icl-batch", "2", "--max-shots", "4", "--d-model", "8",
                 "--n-layer", "1", "--n-head", "2", "--learners", "maml"]) == 0
    assert "maml: already trained" in capsys.readouterr().out
    assert main(["fewshot", "train", "--family", "linear", "--out", str(run)]) == 2
    assert "was started with other settings (family" in capsys.readouterr().err
