"""Aggregation of sequential runs: certificates recomputed from the counts table alone equal the
decisions made while sampling; re-analyses the plan does not cover are refused naming the setting;
PREDICT against scipy's binomial test; the config's sequential keys.

Sampling is emulated as ``MonteCarloSampler.sample_sequential`` does it (every pair draws to the
next look, ``stop`` is called with the pairs still sampling, the last look always stops), with the
plan's own :class:`PairStopRule`, and counts drawn with numpy.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import yaml
from scipy.stats import binomtest

from analysis.counts import CountsError
from analysis.results import GRID_LABEL, cascade_method, certify_table, predict_method, predict_table, single_method
from analysis.summary import predict_markdown, summarize, summarize_predict, to_markdown
from pipeline.certification import FALL_THROUGH, FIRE, UNDECIDED, SparseCounts
from pipeline.config import ConfigError, config_from_dict
from pipeline.schedules import FALLTHROUGH
from pipeline.sequential import (
    LOOK_FIELD,
    PairStopRule,
    SequentialError,
    SequentialPlan,
    default_radii,
    predict_sparse,
    sequential_plan,
    sequential_stage_outcome,
)

C = 4
N0 = 20
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
SIGMAS = (0.25, 0.5, 1.0)


def sample(plan: SequentialPlan, probs: np.ndarray, pair_sigma: np.ndarray, rng, earlier=()) -> tuple:
    """(counts0 [P, C], counts [P, C], stopped look [P]) for pairs with class probabilities
    ``probs`` [P, C], stopped by the plan's PairStopRule as the sampler calls it."""
    rule = PairStopRule(plan, pair_sigma, earlier)
    num = probs.shape[0]
    counts0 = np.stack([rng.multinomial(N0, p) for p in probs])
    counts = np.zeros((num, probs.shape[1]), dtype=np.int64)
    stopped = np.full(num, -1)
    active, drawn = np.arange(num), 0
    for j, target in enumerate(plan.looks):
        counts[active] += np.stack([rng.multinomial(target - drawn, probs[p]) for p in active]).reshape(-1, C)
        drawn = target
        done = np.ones(active.size, bool) if j == len(plan.looks) - 1 else rule(
            j, counts0[active], counts[active], np.full(active.size, target))
        stopped[active[done]] = j
        active = active[~done]
        if not active.size:
            break
    return counts0, counts, stopped


def make_probs(num: int, rng) -> np.ndarray:
    """Per-pair class probabilities: top share from a coin flip to near-certain, label class 0."""
    top = rng.choice([0.35, 0.5, 0.62, 0.8, 0.93, 0.99, 0.999], num)
    rest = rng.dirichlet(np.ones(C - 1), num) * (1 - top)[:, None]
    probs = np.concatenate([top[:, None], rest], axis=1)
    swap = rng.random(num) < 0.15  # some pairs favour a wrong class
    probs[swap] = probs[swap][:, ::-1]
    return probs


def counts_table(ids, label, sigma, counts0, counts, looks=None) -> pa.Table:
    """A counts table (required columns, plus ``look`` when given) from dense counts."""
    def sparse(dense):
        classes = [np.flatnonzero(row).astype(np.int32) for row in dense]
        return pa.array(classes, pa.list_(pa.int32())), pa.array([row[c] for row, c in zip(dense, classes)],
                                                                    pa.list_(pa.int64()))
    c0_classes, c0_values = sparse(counts0)
    c_classes, c_values = sparse(counts)
    columns = {
        "run_id": pa.array(["seq"] * len(ids)), "image_id": pa.array(ids), "label": pa.array(label, pa.int64()),
        "sigma": pa.array(sigma, pa.float64()), "n0": pa.array(counts0.sum(1), pa.int64()),
        "n": pa.array(counts.sum(1), pa.int64()), "counts0_classes": c0_classes, "counts0_values": c0_values,
        "counts_classes": c_classes, "counts_values": c_values,
        "num_classes": pa.array(np.full(len(ids), C), pa.int64()), "pred_clean": pa.array(label, pa.int64()),
    }
    if looks is not None:
        columns[LOOK_FIELD.name] = pa.array(looks, LOOK_FIELD.type)
    return pa.table(columns)


@pytest.fixture(scope="module")
def full_run():
    """A full-mode sequential run over 120 images x 3 sigmas and the decisions taken while sampling."""
    plan = SequentialPlan.geometric(1500, 0.01, RADII, SIGMAS, first=40, ratio=1.5)
    rng = np.random.default_rng(0)
    num = 120
    pair_sigma = np.tile(SIGMAS, num)
    probs = make_probs(pair_sigma.size, rng)
    counts0, counts, stopped = sample(plan, probs, pair_sigma, rng)
    chosen = counts0.argmax(1)
    decided = {}
    for p in range(pair_sigma.size):
        stop, g = plan.decide(pair_sigma[p], counts[p, chosen[p]], stopped[p])
        assert stop  # the plan stopped it there
        decided[p] = (int(chosen[p]) if g >= 0 else -1, float(plan.radius_of(g)))
    ids = np.repeat([f"img{i:03d}" for i in range(num)], len(SIGMAS))
    table = counts_table(ids, np.zeros(pair_sigma.size, int), pair_sigma, counts0, counts, stopped)
    return plan, table, ids, pair_sigma, decided, stopped


def test_full_recomputation_equals_the_decisions_while_sampling(full_run):
    plan, table, ids, pair_sigma, decided, stopped = full_run
    results = certify_table(table, plan=plan)
    assert list(results["method"].cat.categories) == [single_method(s) + GRID_LABEL for s in SIGMAS]
    got = results.set_index(["image_id", "method"])
    for p, (pred, radius) in decided.items():
        row = got.loc[(ids[p], single_method(pair_sigma[p]) + GRID_LABEL)]
        assert (row["pred"], row["radius"]) == (pred, radius)
    preds = np.array([d[0] for d in decided.values()])
    assert 0 < np.mean(preds >= 0) < 1 and np.unique(stopped).size >= 4  # not a degenerate run
    assert np.mean(stopped < len(plan.looks) - 1) > 0.3  # many pairs stopped early
    summary = summarize(results, RADII)
    assert "grid-resolved ACR" in to_markdown(summary, RADII)
    assert "grid-resolved" not in to_markdown(summarize(certify_table(table, cascades=[]), RADII), RADII)


def test_full_re_analyses_covered_and_refused(full_run):
    plan, table, *_ = full_run
    base = certify_table(table, plan=plan)
    for covered in (dict(alpha=0.05), dict(radii=(0.0, 0.5, 1.0)), dict(sigmas=[0.5])):
        again = certify_table(table, plan=plan, **covered)
        expected = base[base["method"].isin(again["method"].cat.categories)].reset_index(drop=True)
        expected["method"] = expected["method"].cat.remove_unused_categories()
        assert again.equals(expected), covered
    refused = {
        "alpha=0.005": dict(alpha=0.005),
        "radii=[0.0, 0.3]": dict(radii=(0.0, 0.3)),
        "cascade(0.5,1.0)": dict(cascades=[[0.5, 1.0]]),
    }
    for name, settings in refused.items():
        with pytest.raises(SequentialError, match=name.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            certify_table(table, plan=plan, **settings)


def test_rows_the_plan_did_not_decide_are_refused(full_run):
    plan, table, ids, pair_sigma, decided, stopped = full_run
    looks = table[LOOK_FIELD.name].to_numpy().copy()
    looks[5] = (looks[5] + 1) % len(plan.looks)
    with pytest.raises(SequentialError, match="column 'look': row 5"):
        certify_table(table.set_column(table.schema.get_field_index("look"), "look", pa.array(looks)), plan=plan)
    fixed = table.drop_columns(["look"])
    assert certify_table(fixed, plan=plan).equals(certify_table(table, plan=plan))  # the look follows from n
    other = SequentialPlan.geometric(1500, 0.01, RADII, SIGMAS, first=50, ratio=1.5)  # other looks
    with pytest.raises(SequentialError, match="not one of the sequential plan's looks"):
        certify_table(fixed, plan=other)
    continuing = SequentialPlan.geometric(1500, 0.01, RADII, SIGMAS, first=40, ratio=1.5, futility=0.0)
    with pytest.raises(SequentialError, match="continues"):
        certify_table(fixed, plan=continuing)  # pairs stopped by futility, which this plan lacks


def simulate_cascade(plan: SequentialPlan, probs: np.ndarray, rng):
    """A cascade-mode run (stage by stage, only the images the plan's walk passes on go on) and the
    (pred, grid radius) decided while sampling. ``probs`` [N, K, C], stages highest sigma first."""
    num = probs.shape[0]
    rows, expected_pred, expected_radius = [], np.full(num, -1), np.zeros(num)
    active = np.arange(num)
    stored = []  # (dense counts [N, C], look [N]) per stage
    for s, sigma in enumerate(plan.stage_sigmas()):
        earlier = [(c[active], look[active]) for c, look in stored]
        counts0, counts, stopped = sample(plan, probs[active, s], np.full(active.size, sigma), rng, earlier)
        chosen = counts0.argmax(1)
        cap = np.full(active.size, np.inf)
        for i, (c_i, look_i) in enumerate(earlier):
            other = c_i.copy()
            other[np.arange(active.size), chosen] = 0
            cap = np.minimum(cap, plan.stage_cap(i, other.max(1), look_i))
        stop, outcome, bins = plan.decide_stage(s, counts[np.arange(active.size), chosen], counts.max(1), stopped,
                                                plan.cap_bin(cap))
        assert stop.all()
        np.testing.assert_array_equal(
            outcome, sequential_stage_outcome(plan, s, SparseCounts.from_dense(counts0), SparseCounts.from_dense(counts)))
        fired = (outcome == FIRE) & (bins >= 0)
        expected_pred[active[fired]] = chosen[fired]
        expected_radius[active[fired]] = plan.radius_of(bins[fired])
        rows.append((active, np.full(active.size, sigma), counts0, counts, stopped))
        full_counts, full_look = np.zeros((num, C), np.int64), np.zeros(num, np.int64)
        full_counts[active], full_look[active] = counts, stopped
        stored.append((full_counts, full_look))
        passes = [FALL_THROUGH, UNDECIDED] if plan.schedule == FALLTHROUGH else [FALL_THROUGH]
        active = active[np.isin(outcome, passes)]
    ids = np.array([f"img{i:03d}" for i in range(num)])
    parts = [np.concatenate(part) for part in zip(*rows)]
    table = counts_table(ids[parts[0]], np.zeros(parts[0].size, int), parts[1], parts[2], parts[3], parts[4])
    return table, ids, expected_pred, expected_radius


@pytest.fixture(scope="module", params=["bonferroni", FALLTHROUGH])
def cascade_run(request):
    plan = SequentialPlan.geometric(1000, 0.01, RADII, SIGMAS, first=40, ratio=1.5, mode="cascade", p0=0.5,
                                    schedule=request.param)
    rng = np.random.default_rng(1)
    num = 150
    top = rng.choice([0.3, 0.45, 0.55, 0.7, 0.9, 0.99], (num, len(SIGMAS)))
    rest = rng.dirichlet(np.ones(C - 1), (num, len(SIGMAS))) * (1 - top)[..., None]
    probs = np.concatenate([top[..., None], rest], axis=-1)
    return (plan, *simulate_cascade(plan, probs, rng))


def test_cascade_recomputation_equals_the_decisions_while_sampling(cascade_run):
    plan, table, ids, expected_pred, expected_radius = cascade_run
    sigmas_in_table = pa.compute.unique(table["sigma"]).to_pylist()
    assert len(sigmas_in_table) == 3 and table.num_rows < 3 * ids.size  # lower stages only where reached
    results = certify_table(table, plan=plan)
    method = cascade_method(SIGMAS) + GRID_LABEL
    assert list(results["method"].cat.categories) == [method]
    got = results.set_index("image_id").loc[ids]
    np.testing.assert_array_equal(got["pred"], expected_pred)
    np.testing.assert_array_equal(got["radius"], expected_radius)
    assert 0 < np.mean(expected_pred >= 0) < 1 and np.any(got["fired_sigma"] < 1.0)


def test_cascade_re_analyses_covered_and_refused(cascade_run):
    plan, table, *_ = cascade_run
    other = "bonferroni" if plan.schedule == FALLTHROUGH else FALLTHROUGH
    base = certify_table(table, plan=plan)
    assert certify_table(table, plan=plan, alpha=0.02, radii=(0.0, 1.0)).equals(base)
    for setting, settings in {"p0=0.6": dict(p0=0.6), "alpha=0.001": dict(alpha=0.001),
                              "schedule='paper'": dict(schedule="paper"),
                              f"schedule='{other}'": dict(schedule=other),
                              r"cascade\(0.5,1.0\)": dict(cascades=[[0.5, 1.0]]),
                              r"sigmas=\[0.25\]": dict(sigmas=[0.25])}.items():
        with pytest.raises(SequentialError, match=setting):
            certify_table(table, plan=plan, **settings)
    at_half = np.flatnonzero(table["sigma"].to_numpy() == 0.5)
    victim = table["image_id"][int(at_half[0])].as_py()
    keep = np.ones(table.num_rows, bool)
    keep[at_half[0]] = False
    with pytest.raises(CountsError, match=f"image_id='{victim}' has no row at sigma=0.5"):
        certify_table(table.filter(pa.array(keep)), plan=plan)


# ----------------------------------------------------------------------------- PREDICT


def binomtest_predict(counts: np.ndarray, alpha: float) -> np.ndarray:
    """Cohen et al.'s PREDICT with scipy's binomtest, row by row."""
    out = []
    for row in counts:
        order = np.argsort(-row, kind="stable")
        k1, k2 = int(row[order[0]]), int(row[order[1]])
        out.append(int(order[0]) if binomtest(k1, k1 + k2, 0.5).pvalue <= alpha else -1)
    return np.array(out)


def test_fixed_predict_matches_scipy_binomtest():
    rng = np.random.default_rng(2)
    probs = make_probs(400, rng)
    counts = np.stack([rng.multinomial(rng.integers(1, 300), p) for p in probs])
    for alpha in (0.001, 0.05):
        expected = binomtest_predict(counts, alpha)
        np.testing.assert_array_equal(predict_sparse(SparseCounts.from_dense(counts), alpha), expected)
        assert 0 < np.mean(expected >= 0) < 1
    ids = [f"img{i:03d}" for i in range(400)]
    label = rng.integers(0, C, 400)
    table = counts_table(ids, label, np.full(400, 0.5), np.zeros((400, C), np.int64), counts)
    results = predict_table(table, alpha=0.05)
    expected = binomtest_predict(counts, 0.05)
    np.testing.assert_array_equal(results.set_index("image_id").loc[ids, "pred"], expected)
    summary = summarize_predict(results).iloc[0]
    assert summary["method"] == predict_method(0.5) and summary["n_images"] == 400
    assert np.isclose(summary["abstain_rate"], np.mean(expected < 0))
    assert np.isclose(summary["accuracy"], np.mean((expected == label) & (expected >= 0)))
    assert "| predict sigma=0.5 | 400 |" in predict_markdown(summarize_predict(results))


def test_sequential_predict_is_the_decision_while_sampling_and_a_level_test():
    plan = SequentialPlan.geometric(2000, 0.01, (0.0,), (0.25, 0.5), first=30, ratio=1.5, mode="predict")
    rng = np.random.default_rng(3)
    pair_sigma = np.tile([0.25, 0.5], 150)
    probs = make_probs(pair_sigma.size, rng)
    _, counts, stopped = sample(plan, probs, pair_sigma, rng)
    ids = np.repeat([f"img{i:03d}" for i in range(150)], 2)
    table = counts_table(ids, np.zeros(ids.size, int), pair_sigma, np.zeros_like(counts), counts, stopped)
    results = predict_table(table, plan=plan, alpha=plan.alpha).set_index(["image_id", "method"])
    levels = plan.alpha * np.asarray(plan.spend)
    got = np.array([results.loc[(i, predict_method(s)), "pred"] for i, s in zip(ids, pair_sigma)])
    np.testing.assert_array_equal(got, [binomtest_predict(c[None], lv)[0] for c, lv in zip(counts, levels[stopped])])
    assert np.unique(stopped).size >= 3 and 0 < np.mean(got >= 0) < 1
    assert np.mean(np.asarray(plan.looks)[stopped]) < 0.5 * plan.n_max
    with pytest.raises(SequentialError, match="alpha=0.001"):
        predict_table(table, plan=plan, alpha=0.001)
    with pytest.raises(SequentialError, match="predict_table"):
        certify_table(table, plan=plan)


# ----------------------------------------------------------------------------- config


@pytest.fixture
def raw():
    with open("configs/small.yaml") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("override, message", [
    ("smoothing.sampling=adaptive", "smoothing.sampling: must be one of fixed, sequential"),
    ("smoothing.radii=[0.5, -1]", "smoothing.radii: must be a non-empty list of finite numbers >= 0"),
    ("smoothing.radii=[0.5, 0.5]", "smoothing.radii: must not repeat a value"),
    ("smoothing.sequential.first_look=0", "smoothing.sequential.first_look: must be a positive integer"),
    ("smoothing.sequential.look_ratio=1", "smoothing.sequential.look_ratio: must be a finite number > 1"),
    ("smoothing.sequential.final_share=0", "smoothing.sequential.final_share: must be a number in (0, 1]"),
    ("smoothing.sequential.futility=0.5", "smoothing.sequential.futility: must be a number in [0, 0.5)"),
    ("smoothing.sequential.looks=3", "smoothing.sequential.looks: unknown key"),
    ("smoothing.mode=greedy", "smoothing.mode: must be one of full, cascade, predict"),
])
def test_config_errors_name_their_keys(raw, override, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, [override])
    assert str(err.value).startswith(message)


def test_config_rules_between_keys_and_the_plan(raw):
    with pytest.raises(ConfigError, match=r"^smoothing.alpha: must be < 0.5 with sequential sampling"):
        config_from_dict(raw, ["smoothing.sampling=sequential", "smoothing.alpha=0.6"])
    with pytest.raises(ConfigError, match=r"^smoothing.schedule: must be bonferroni or bonferroni-fallthrough"):
        config_from_dict(raw, ["smoothing.sampling=sequential", "smoothing.mode=cascade", "smoothing.schedule=paper"])
    fixed = config_from_dict(raw)
    assert fixed.smoothing["sampling"] == "fixed" and sequential_plan(fixed.smoothing) is None
    cfg = config_from_dict(raw, ["smoothing.sampling=sequential", "smoothing.n=5000", "smoothing.mode=cascade",
                                 "smoothing.sequential.look_ratio=2"])
    plan = sequential_plan(cfg.smoothing)
    assert plan.n_max == 5000 and plan.mode == "cascade" and plan.sigmas == cfg.smoothing["sigmas"]
    assert plan.looks[:3] == (100, 200, 400) and plan.futility == 0.1
    assert sum(plan.spend) == pytest.approx(1.0) and plan.spend[-1] >= 0.75
    with pytest.raises(ConfigError, match=r"^smoothing.sequential.top_share: must be <= 1 - final_share"):
        config_from_dict(raw, ["smoothing.sampling=sequential", "smoothing.sequential.top_share=0.3"])
    assert plan.radii == default_radii(5000, cfg.smoothing["alpha"], cfg.smoothing["sigmas"])
    assert SequentialPlan.from_dict(plan.to_dict()) == plan
    grid = config_from_dict(raw, ["smoothing.sampling=sequential", "smoothing.radii=[1.0, 0, 0.5]"])
    assert sequential_plan(grid.smoothing).radii == (0.0, 0.5, 1.0)


def test_default_radii_reach_the_largest_certifiable_radius():
    radii = default_radii(10_000, 0.001, (0.25, 0.5, 1.0))
    assert radii[0] == 0.0 and np.allclose(np.diff(radii), 0.25) and radii[-1] == 3.0  # 1.0 Phi^-1(0.001^1e-4) = 3.2
    assert default_radii(5, 0.001, (0.5,)) == (0.0,)
