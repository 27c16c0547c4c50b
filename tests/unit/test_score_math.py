"""Hand-computed values for the 3SPO score, branching and step reward.

docs/algorithm.md "State score", "Branching and truncation", "Step reward".
"""

import math

import pytest

from spo3.score_store.score_math import (
    Counts,
    ScoreParams,
    count_leaf,
    is_novel,
    is_truncated,
    lambda_t,
    n_rollouts,
    novelty_weight,
    raw_score,
    reward_score,
    state_score,
    step_reward,
    success_rate,
)

P = ScoreParams()  # alpha 1, xi 10, zeta 0.1, g_max 8, omega_k 0.1, eps 1e-6


def test_unseen_state_scores_one_and_branches_fully():
    assert state_score(Counts(0, 0), t=1000, p=P) == 1.0
    assert n_rollouts(1.0, P.g_max) == 8


def test_t_equal_one_means_no_history_weight():
    # lambda(1) = alpha ln 1 = 0, so S = exp(0) = 1 whatever the success rate.
    assert lambda_t(1, 50.0) == 0.0
    assert state_score(Counts(4, 4), t=1, p=P) == 1.0
    with pytest.raises(ValueError):
        lambda_t(0, 1.0)


def test_score_hand_value_alpha_1():
    # N=4, N_s=2, t=4: SR = 2/(4+1e-6) = 0.499999875, lambda = ln 4 = 1.3862944
    # S = exp(-1.3862944 * 0.499999875) = 0.50000009 -> n = ceil(4.0000007) = 5
    c = Counts(4, 2)
    sr = 2 / (4 + 1e-6)
    assert success_rate(c) == pytest.approx(sr, rel=1e-12)
    s = state_score(c, t=4, p=P)
    assert s == pytest.approx(math.exp(-math.log(4) * sr), rel=1e-12)
    assert s == pytest.approx(0.5, abs=1e-6)
    assert n_rollouts(s, 8) == 5


def test_alpha_50_makes_score_almost_binary():
    # Same counts with alpha = 50: S = 4 ** (-25 * 0.999999750) ~ 8.9e-16: tiny but positive,
    # so the path continues with a single action (n = 1), it is not truncated.
    p50 = P.model_copy(update={"alpha": 50.0})
    s = state_score(Counts(4, 2), t=4, p=p50)
    assert 0.0 < s < 1e-14
    assert n_rollouts(s, 8) == 1
    # A state that never succeeded keeps S = 1 under both alphas.
    assert state_score(Counts(5, 0), t=4, p=p50) == 1.0


@pytest.mark.parametrize(
    "counts,truncated",
    [
        (Counts(10, 1), False),  # N_fail = 9 < xi
        (Counts(11, 1), True),  # N_fail = 10 >= xi and SR = 0.0909 <= 0.1
        (Counts(20, 2), True),  # SR = 2/(20+eps) just below 0.1
        (Counts(20, 3), False),  # SR = 0.15 > zeta: still worth exploring
        (Counts(10, 0), True),  # N_fail = 10, SR = 0
        (Counts(9, 0), False),
    ],
)
def test_truncation_indicator(counts, truncated):
    assert is_truncated(counts, P) is truncated
    s = state_score(counts, t=50, p=P)
    assert (s == 0.0) is truncated
    assert (n_rollouts(s, 8) == 0) is truncated


def test_root_is_never_truncated():
    c = Counts(30, 0)
    assert state_score(c, t=100, p=P) == 0.0
    assert state_score(c, t=100, p=P, is_root=True) == 1.0  # SR = 0 -> exp(0)
    assert n_rollouts(state_score(c, t=100, p=P, is_root=True), 8) == 8


def test_n_rollouts_float_noise_and_bounds():
    assert n_rollouts(0.375, 8) == 3
    assert n_rollouts(0.37500000000000006, 8) == 3
    assert n_rollouts(0.3751, 8) == 4
    assert n_rollouts(0.0, 8) == 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            n_rollouts(bad, 8)


def test_novelty_weight():
    assert novelty_weight(0, 0.1) == 0.5
    assert novelty_weight(10, 0.1) == pytest.approx(0.5 * math.exp(-1.0))  # 0.18393972


def test_step_reward_hand_values():
    # (Spec change: step_reward takes the counts, t and the path, and applies S~ and R_novel itself.)
    kw = dict(p=P, invalid=False, path=["a"], t=4)
    half = Counts(4, 2)  # S~ = exp(-ln 4 * 0.5) = 0.5 at t = 4
    # First visit (N=0): w = 0.5, all weight on novelty: 0.5 * 1 + 0 * (1 - 0.5) = 0.5
    assert step_reward(
        before=Counts(0, 0), after=half, next_key="b", success=None, **kw
    ) == pytest.approx(0.5)
    # N=10 (no success: S~ = 1): w = 0.18394; 0.18394 * 1 + 0.31606 * (1 - 0.5) = 0.34197
    w = 0.5 * math.exp(-1.0)
    assert step_reward(
        before=Counts(10, 0), after=half, next_key="b", success=None, **kw
    ) == pytest.approx(w + (0.5 - w) * 0.5, abs=1e-6)
    # Same state (not novel), moving to a harder state is penalized: 0 + 0.31606 * (0.5 - 1) = -0.15803
    assert step_reward(
        before=Counts(10, 5), after=Counts(0, 0), next_key="a", success=None, **kw
    ) == pytest.approx((0.5 - w) * (math.exp(-math.log(4) * 5 / (10 + 1e-6)) - 1.0))
    # Terminal success adds 0.5 * success; invalid output subtracts the penalty 0.1.
    r = step_reward(
        before=Counts(0, 0),
        after=Counts(0, 0),
        next_key="a",
        success=1.0,
        p=P,
        invalid=True,
        path=["a"],
        t=4,
    )
    assert r == pytest.approx(0.5 - 0.1)
    r = step_reward(before=Counts(0, 0), after=Counts(0, 0), next_key="a", success=0.4, **kw)
    assert r == pytest.approx(0.2)


def test_raw_score_has_no_truncation_indicator():
    dead = Counts(12, 0)  # N_fail 12 >= xi, SR 0: truncated, S = 0
    assert state_score(dead, t=50, p=P) == 0.0
    assert raw_score(dead, t=50, p=P) == 1.0  # exp(-lambda * 0)
    assert raw_score(Counts(4, 2), t=4, p=P) == pytest.approx(state_score(Counts(4, 2), t=4, p=P))
    assert reward_score(dead, 50, P, truncated=True) == 1.0
    assert (
        reward_score(dead, 50, P.model_copy(update={"reward_score": "truncated"}), truncated=True)
        == 0.0
    )


def test_dead_end_child_is_never_the_top_reward_under_raw():
    """A parent with history, three children: a dead end (truncated: 12 failures), a fresh state and
    a state on the way to success. Under `truncated` the dead end earns the most (S jumps to 0);
    under `raw` it earns no more than the fresh state and less than the promising one."""
    before, t = Counts(20, 4), 40
    children = {
        "dead": (Counts(12, 0), True),
        "fresh": (Counts(0, 0), False),
        "good": (Counts(6, 4), False),
    }

    def rewards(params):
        return {
            k: step_reward(
                path=["root", "p"],
                next_key=k,
                before=before,
                after=c,
                t=t,
                success=None,
                invalid=False,
                p=params,
                after_truncated=tr,
            )
            for k, (c, tr) in children.items()
        }

    lit = rewards(P.model_copy(update={"reward_score": "truncated"}))
    assert max(lit, key=lit.get) == "dead" and lit["dead"] > lit["good"] > lit["fresh"]
    raw = rewards(P)
    assert raw["dead"] <= raw["fresh"] < raw["good"]
    assert max(raw, key=raw.get) == "good"


def test_novelty_path_vs_parent():
    path = ["room-a", "room-b", "room-c"]
    parent = P.model_copy(update={"novelty": "parent"})
    assert is_novel("room-d", path, P) and is_novel("room-d", path, parent)
    # Walking back to room b: new relative to the parent, not to the path.
    assert not is_novel("room-b", path, P) and is_novel("room-b", path, parent)
    assert not is_novel("room-c", path, P) and not is_novel("room-c", path, parent)
    kw = dict(before=Counts(0, 0), after=Counts(0, 0), t=5, success=None, invalid=False, path=path)
    assert step_reward(next_key="room-b", p=P, **kw) == 0.0
    assert step_reward(next_key="room-b", p=parent, **kw) == 0.5
    with pytest.raises(ValueError):
        is_novel("x", [], P)


def test_novelty_none_leaves_score_and_success():
    none = P.model_copy(update={"novelty": "none"})
    assert not is_novel("room-d", ["room-a"], none)
    kw = dict(p=none, invalid=False, path=["a"], t=4)
    # First visit of a new state: path novelty pays 0.5, none pays nothing (w = 0.5 leaves no score weight).
    assert (
        step_reward(before=Counts(0, 0), after=Counts(0, 0), next_key="b", success=None, **kw)
        == 0.0
    )
    # N=10: only (0.5 - w) (S~(s_t) - S~(s_t+1)) remains; S~ = 1 and 0.5.
    w = 0.5 * math.exp(-1.0)
    assert step_reward(
        before=Counts(10, 0), after=Counts(4, 2), next_key="b", success=None, **kw
    ) == pytest.approx((0.5 - w) * 0.5, abs=1e-6)
    assert (
        step_reward(before=Counts(0, 0), after=Counts(0, 0), next_key="b", success=1.0, **kw) == 0.5
    )


def test_step_reward_rejects_raw_env_rewards():
    with pytest.raises(ValueError, match="success"):
        step_reward(
            before=Counts(0, 0),
            after=Counts(0, 0),
            t=1,
            path=["a"],
            next_key="b",
            success=10.0,
            invalid=False,
            p=P,
        )


def test_new_settings_validate():
    with pytest.raises(ValueError, match="reward_score"):
        ScoreParams(reward_score="literal")
    with pytest.raises(ValueError, match="novelty"):
        ScoreParams(novelty="room")


def test_params_validate():
    with pytest.raises(ValueError):
        ScoreParams(zeta=2.0)
    with pytest.raises(ValueError):
        ScoreParams(g_max=0)


# --- Settings against the known hazards (docs/algorithm.md "Known hazards") -------------------


def test_correlated_leaves_truncate_the_winning_path_unless_counted_per_rollout():
    # One DFS rollout: 16 failed leaves below state x, then the one winning leaf.
    leaves = [(["r", "x", f"dead{i}"], False) for i in range(16)] + [(["r", "x", "goal"], True)]
    p = ScoreParams()
    per_leaf: dict[str, Counts] = {}
    per_rollout: dict[str, Counts] = {}
    seen: dict[str, bool] = {}
    for path, won in leaves:
        per_leaf.update(count_leaf(per_leaf, path, won))
        per_rollout.update(count_leaf(per_rollout, path, won, seen=seen))
    # Per leaf (today): x at N = 17, N_s = 1 -> N_f 16 >= xi, SR 0.059 <= zeta: truncated.
    assert per_leaf["x"] == Counts(17, 1)
    assert is_truncated(per_leaf["x"], p) and state_score(per_leaf["x"], 18, p) == 0.0
    # Per rollout: the rollout adds 1 to N and 1 to N_s (a leaf below x won).
    assert per_rollout["x"] == Counts(1, 1) and per_rollout["r"] == Counts(1, 1)
    assert per_rollout["dead3"] == Counts(1, 0) and per_rollout["goal"] == Counts(1, 1)
    assert not is_truncated(per_rollout["x"], p)
    # A second rollout counts again, once.
    again = count_leaf(per_rollout, ["r", "x", "dead0"], False, seen={})
    assert again["x"] == Counts(2, 1)


def test_truncate_won_false_keeps_a_state_with_a_success_open():
    c = Counts(17, 1)  # N_f 16 >= 10, SR 0.059 <= 0.1
    assert state_score(c, 18, ScoreParams()) == 0.0  # today: truncated despite its win
    keep = ScoreParams(truncate_won=False)
    assert not is_truncated(c, keep) and state_score(c, 18, keep) > 0.0
    # A state that never won is still truncated.
    assert is_truncated(Counts(10, 0), keep)


def test_sr_prior_ranks_a_well_explored_dead_end_below_an_unexplored_state():
    t = 100  # lambda = ln 100
    flat = ScoreParams(novelty="none")  # score term only
    dead, unseen, here = Counts(500, 0), Counts(0, 0), Counts(20, 0)

    def r(after: Counts, p: ScoreParams) -> float:
        return step_reward(
            path=["h"], next_key="n", before=here, after=after, t=t, success=None,
            invalid=False, p=p,
        )  # fmt: skip

    # Without a prior both score S~ = 1 (SR 0): the score term is silent, both steps earn 0.
    assert raw_score(dead, t, flat) == raw_score(unseen, t, flat) == 1.0
    assert r(dead, flat) == r(unseen, flat) == 0.0
    # Beta(1, 1): SR(unseen) = 1/2 -> S~ = 100^-0.5 = 0.1; SR(dead) = 1/502 -> S~ = 100^(-1/502) = 0.990868;
    # SR(here) = 1/22 -> S~ = 100^(-1/22) = 0.811131; w(20) = 0.5 e^-2 = 0.067668.
    prior = ScoreParams(novelty="none", sr_prior_a=1.0, sr_prior_b=1.0)
    assert raw_score(unseen, t, prior) == pytest.approx(0.1, abs=1e-6)
    assert raw_score(dead, t, prior) == pytest.approx(0.990868, abs=1e-6)
    w = 0.5 * math.exp(-2.0)
    assert r(unseen, prior) == pytest.approx((0.5 - w) * (0.811131 - 0.1), abs=1e-6)
    assert r(dead, prior) == pytest.approx((0.5 - w) * (0.811131 - 0.990868), abs=1e-6)
    assert r(dead, prior) < 0 < r(unseen, prior)
    # Branching and truncation keep the raw SR: an unseen state still gets g_max samples.
    assert state_score(unseen, t, prior) == 1.0
    assert state_score(Counts(3, 1), t, prior) == state_score(Counts(3, 1), t, ScoreParams())


def test_dead_end_novelty_false_pays_no_novelty_for_dying():
    kw = dict(path=["a"], next_key="b", before=Counts(), after=Counts(), t=1, invalid=False)
    # Today: an unseen losing terminal earns w(0) = 0.5, like a new room.
    assert step_reward(**kw, success=0.0, p=ScoreParams(), dead_end=True) == 0.5
    off = ScoreParams(dead_end_novelty=False)
    assert step_reward(**kw, success=0.0, p=off, dead_end=True) == 0.0
    assert step_reward(**kw, success=None, p=off, dead_end=False) == 0.5  # a new room still pays
