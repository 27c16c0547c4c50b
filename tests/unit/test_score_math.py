"""Hand-computed values for the 3SPO score, branching and step reward.

docs/algorithm.md "State score", "Branching and truncation", "Step reward".
"""

import math

import pytest

from spo3.score_store.score_math import (
    Counts,
    ScoreParams,
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
