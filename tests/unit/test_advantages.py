"""Hand-computed checks of the advantage estimators (spo3/learner/advantages.py)."""

import math

import numpy as np
import pytest

from spo3.learner.advantages import (
    discounted_returns,
    gigpo_advantages,
    group_advantages,
    grpo_advantages,
    is_informative,
    step_group_advantages,
)

EPS = 1e-6


def test_std_normalization_binary_group():
    # [1,0,0,1]: mean 0.5, population std sqrt(mean((+-0.5)^2)) = 0.5
    # A = (+-0.5) / (0.5 + 1e-6)
    a = group_advantages([1, 0, 0, 1])
    s = 0.5 / (0.5 + EPS)
    np.testing.assert_allclose(a, [s, -s, -s, s], rtol=0, atol=1e-12)


def test_std_normalization_three_values():
    # [0.5,1.5,2.5]: mean 1.5, deviations [-1,0,1], var (1+0+1)/3 = 2/3, std sqrt(2/3) = 0.816497
    a = group_advantages([0.5, 1.5, 2.5])
    std = math.sqrt(2 / 3)
    np.testing.assert_allclose(a, [-1 / (std + EPS), 0.0, 1 / (std + EPS)], atol=1e-12)
    assert a[2] == pytest.approx(1.224744, abs=1e-5)  # 1/0.816497


def test_mean_only():
    # mean_only keeps r - mean: [1,0,0,1] -> [0.5,-0.5,-0.5,0.5]; [0.5,1.5,2.5] -> [-1,0,1]
    np.testing.assert_allclose(
        group_advantages([1, 0, 0, 1], mean_only=True), [0.5, -0.5, -0.5, 0.5]
    )
    np.testing.assert_allclose(group_advantages([0.5, 1.5, 2.5], mean_only=True), [-1.0, 0.0, 1.0])


def test_singleton_group_is_zero_and_uninformative():
    np.testing.assert_array_equal(group_advantages([0.7]), [0.0])
    np.testing.assert_array_equal(group_advantages([0.7], mean_only=True), [0.0])
    assert not is_informative([0.7])
    assert group_advantages([]).shape == (0,)
    assert not is_informative([])


def test_zero_spread_group_is_zero_and_uninformative():
    np.testing.assert_array_equal(group_advantages([0.3, 0.3, 0.3]), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(group_advantages([1, 1], mean_only=True), [0.0, 0.0])
    assert not is_informative([0.3, 0.3, 0.3])
    assert is_informative([0.3, 0.4])


def test_step_group_advantages_is_group_advantages():
    r = [0.2, 0.9, 0.4]
    np.testing.assert_array_equal(step_group_advantages(r), group_advantages(r))
    np.testing.assert_array_equal(
        step_group_advantages(r, mean_only=True), group_advantages(r, mean_only=True)
    )


def test_grpo_one_success_in_four():
    # [1,0,0,0]: mean 0.25, deviations [0.75,-0.25,-0.25,-0.25]
    # var (0.5625 + 3*0.0625)/4 = 0.75/4 = 0.1875, std = 0.4330127
    # A = [0.75, -0.25, -0.25, -0.25] / (0.4330127 + 1e-6) = [1.7320468, -0.5773489, ...]
    a = grpo_advantages([1, 0, 0, 0])
    std = math.sqrt(0.1875)
    np.testing.assert_allclose(a, np.array([0.75, -0.25, -0.25, -0.25]) / (std + EPS), atol=1e-12)
    assert a[0] == pytest.approx(math.sqrt(3), abs=1e-5)
    assert a[1] == pytest.approx(-1 / math.sqrt(3), abs=1e-5)


def test_discounted_returns():
    # gamma 0.5 on [0,0,1]: G2 = 1, G1 = 0 + 0.5*1 = 0.5, G0 = 0 + 0.5*0.5 = 0.25
    np.testing.assert_allclose(discounted_returns([0, 0, 1], 0.5), [0.25, 0.5, 1.0])
    # [1,2] gamma 0.9: G1 = 2, G0 = 1 + 1.8 = 2.8
    np.testing.assert_allclose(discounted_returns([1, 2], 0.9), [2.8, 2.0])
    assert discounted_returns([], 0.9).shape == (0,)


# Two episodes that both start in anchor "s0", then diverge.
# gamma 0.5: ep0 rewards [0, 1] -> returns [0.5, 1.0]; ep1 rewards [0, 0] -> returns [0, 0].
_EPISODES = [[("s0", 0.0), ("s1", 1.0)], [("s0", 0.0), ("s2", 0.0)]]
_RETURNS = [1.0, 0.0]


def test_gigpo_shared_anchor_std():
    # Episode term: returns [1,0] -> mean 0.5, std 0.5 -> +-0.5/(0.5+eps) = +-e
    # Step term, anchor s0: discounted returns [0.5, 0] -> mean 0.25, std 0.25 -> +-0.25/(0.25+eps) = +-s
    # Anchors s1, s2 are singletons -> 0.
    # omega 1: ep0 = [e + s, e] ~ [2, 1]; ep1 = [-e - s, -e] ~ [-2, -1]
    e = 0.5 / (0.5 + EPS)
    s = 0.25 / (0.25 + EPS)
    out = gigpo_advantages(_EPISODES, _RETURNS, gamma=0.5, omega=1.0)
    assert len(out) == 2
    np.testing.assert_allclose(out[0], [e + s, e], atol=1e-12)
    np.testing.assert_allclose(out[1], [-e - s, -e], atol=1e-12)


def test_gigpo_shared_anchor_mean_only_and_omega():
    # mean_only: episode term [0.5, -0.5]; step term on s0: [0.25, -0.25]
    # omega 0.5: ep0 = [0.5 + 0.5*0.25, 0.5] = [0.625, 0.5]; ep1 = [-0.625, -0.5]
    out = gigpo_advantages(_EPISODES, _RETURNS, gamma=0.5, omega=0.5, mean_only=True)
    np.testing.assert_allclose(out[0], [0.625, 0.5])
    np.testing.assert_allclose(out[1], [-0.625, -0.5])


def test_gigpo_unique_anchors_give_only_episode_term():
    # Every anchor appears once -> step term 0 -> each step carries its episode's GRPO advantage.
    episodes = [[("a", 0.0), ("b", 1.0), ("c", 0.0)], [("d", 0.0)], [("e", 0.0), ("f", 0.0)]]
    returns = [1.0, 0.0, 0.0]
    out = gigpo_advantages(episodes, returns, gamma=0.95)
    ep = grpo_advantages(returns)
    assert [len(x) for x in out] == [3, 1, 2]
    for i, adv in enumerate(out):
        np.testing.assert_allclose(adv, np.full(len(episodes[i]), ep[i]))


def test_gigpo_default_gamma_uses_discounted_return_from_step():
    # Anchor "x" at step 0 of both episodes, gamma 0.95, mean_only, omega 1, equal episode returns
    # (episode term 0): ep0 rewards [0, 1] -> G0 = 0.95; ep1 rewards [1] -> G0 = 1
    # group [0.95, 1]: mean 0.975 -> [-0.025, +0.025]; second step of ep0 ("y") is a singleton.
    out = gigpo_advantages([[("x", 0.0), ("y", 1.0)], [("x", 1.0)]], [1.0, 1.0], mean_only=True)
    np.testing.assert_allclose(out[0], [-0.025, 0.0], atol=1e-12)
    np.testing.assert_allclose(out[1], [0.025], atol=1e-12)


def test_gigpo_length_mismatch_raises():
    with pytest.raises(ValueError):
        gigpo_advantages(_EPISODES, [1.0])


# --- Settings against the known hazards (docs/algorithm.md "Known hazards", "Baselines") ---------

from spo3.learner.batch import batch_rows, group_rows  # noqa: E402
from spo3.learner.config import AdvantageConfig  # noqa: E402
from spo3.transport.contracts import Group, GroupMember, Transition  # noqa: E402


def _t(key: str, reward: float, *, invalid: bool = False, done: bool = False) -> Transition:
    return Transition(
        state_key=key,
        next_state_key=key,
        prompt_token_ids=[1],
        token_ids=[2],
        logprobs=[-1.0],
        action=None if invalid else "a",
        invalid=invalid,
        reward=reward,
        done=done,
        policy_version=0,
    )


def _step_group(gid: str, rewards) -> Group:
    members = [GroupMember(transitions=[_t("s", r)], score=r) for r in rewards]
    return Group(
        group_id=gid, run="r", algo="3spo", task_id="t", node_id="n", depth=0,
        members=members, created_at=0.0,
    )  # fmt: skip


def _novelty_group(w: float) -> list[float]:
    # 8 children of one state, 2 reached a new state: rewards {w(N), 0}, nothing else differs.
    return [w, w, 0, 0, 0, 0, 0, 0]


def _advs(rows) -> list[float]:
    return [r.advantage for r in rows]


def test_std_normalisation_cancels_the_novelty_weight_and_the_alternatives_keep_it():
    # mean w/4; novel members deviate by 0.75 w, the others by -0.25 w;
    # population std = w * sqrt(0.25 * 0.75) = 0.4330127 w, so std gives 0.75 / 0.4330127 = 1.7320508
    # for the novel ones whatever w is: the hazard.
    for w in (0.5, 0.0012):
        a = group_advantages(_novelty_group(w), norm="std")
        assert a[0] == pytest.approx(1.7320508, abs=5e-3)  # 1.7287 at w = 0.0012 (the 1e-6)
    # mean: 0.75 w -> 0.375 at w = 0.5 and 0.0009 at w = 0.0012 (the weight survives).
    assert group_advantages(_novelty_group(0.5), norm="mean")[0] == pytest.approx(0.375)
    assert group_advantages(_novelty_group(0.0012), norm="mean")[0] == pytest.approx(0.0009)
    # floor 0.1: std 0.2165 > 0.1 at w = 0.5 -> 1.7320508; std 0.00052 < 0.1 at w = 0.0012 -> 0.0009/0.1.
    assert group_advantages(_novelty_group(0.5), norm="floor", floor=0.1)[0] == pytest.approx(
        1.7320508, abs=1e-6
    )
    assert group_advantages(_novelty_group(0.0012), norm="floor", floor=0.1)[0] == pytest.approx(
        0.009
    )


def test_3spo_norm_setting_in_the_learner_rows():
    big, small = (
        _step_group("big", _novelty_group(0.5)),
        _step_group("small", _novelty_group(0.0012)),
    )
    # Today (std): both groups push their novel members at +1.73.
    assert max(_advs(group_rows(small))) == pytest.approx(1.7320508, abs=5e-3)
    assert AdvantageConfig().norm("3spo") == "std"
    assert AdvantageConfig(mean_only=True).norm("3spo") == "mean"  # mean_only still works
    mean = AdvantageConfig(norm_3spo="mean")
    assert max(_advs(group_rows(small, mean))) == pytest.approx(0.0009)
    # batch: one scale for both groups, the RMS of the 16 centred values:
    # big: 2 * 0.375^2 + 6 * 0.125^2 = 0.375; small: 0.375 * 0.0024^2 = 2.16e-6
    # sqrt((0.375 + 2.16e-6) / 16) = 0.1530935 -> big novel 0.375 / 0.1530935 = 2.4494827,
    # small novel 0.0009 / 0.1530935 = 0.0058788: the 0.0024 ratio of the weights survives.
    rows = batch_rows([big, small], AdvantageConfig(norm_3spo="batch"))
    assert rows[0].advantage == pytest.approx(2.4494827, abs=5e-5)
    assert rows[8].advantage == pytest.approx(0.0058788, abs=1e-6)
    # The baselines keep their own setting.
    cfg = AdvantageConfig(norm_3spo="mean")
    assert (cfg.norm("grpo"), cfg.norm("gigpo")) == ("std", "std")


def _episodes_group(algo: str) -> Group:
    # Episode A: s0 --0--> s1 --invalid (-0.1)--> s1 --1 (won)-->; episode B: s0 --0--> s2 --0--> (lost).
    a = [_t("s0", 0.0), _t("s1", -0.1, invalid=True), _t("s1", 1.0, done=True)]
    b = [_t("s0", 0.0), _t("s2", 0.0, done=True)]
    members = [GroupMember(transitions=a, score=0.9), GroupMember(transitions=b, score=0.0)]
    return Group(
        group_id=algo, run="r", algo=algo, task_id="t", node_id="r", depth=0,
        members=members, created_at=0.0,
    )  # fmt: skip


_TODAY = AdvantageConfig(
    baseline_std="population", baseline_stats="episodes", baseline_invalid="return"
)


# The reference numbers below were computed with the reference implementations themselves (not
# kept here): verl-agent at upstream commit 796ed310287fa605c9292a0fce07a86d79fde05e,
# ray_trainer.compute_advantage (GRPO: verl's compute_grpo_outcome_advantage with
# norm_adv_by_std_in_grpo; GiGPO: core_gigpo.compute_gigpo_outcome_advantage, step_advantage_w 1,
# gamma 0.5) after EpisodeRewardManager, core_gigpo.compute_step_discounted_returns and
# apply_invalid_action_penalty (coef 0.1), on this group encoded as five step rows (one
# trajectory id per episode, anchors s0 s1 s1 / s0 s2, the second row invalid). They divide by
# std + 1e-6 in float32, as the project does: hence the tolerance.


def test_grpo_as_the_reference_computes():
    g = _episodes_group("grpo")
    # Before this change: returns [0.9, 0], population std 0.45 -> +-1 on every row of an episode.
    np.testing.assert_allclose(_advs(group_rows(g, _TODAY)), [1, 1, 1, -1, -1], atol=5e-5)
    # Reference (defaults): the penalty on the invalid row only -> row scores A [1, 0.9, 1], B [0, 0];
    # mean over the 5 rows 2.9 / 5 = 0.58; deviations [0.42, 0.32, 0.42, -0.58, -0.58];
    # squares sum 0.1764 + 0.1024 + 0.1764 + 0.3364 + 0.3364 = 1.128; sample std sqrt(1.128 / 4) = 0.5310367
    # -> [0.7909058, 0.6025949, 0.7909058, -1.0922032, -1.0922032] (without the 1e-6); the reference:
    expected = [0.7909042, 0.6025936, 0.7909042, -1.0922011, -1.0922011]
    np.testing.assert_allclose(_advs(group_rows(g)), expected, atol=1e-6)
    # One switch at a time: population std over the rows: sqrt(1.128 / 5) = 0.4749737
    # -> [0.42, 0.32, -0.58] / 0.4749737.
    pop = AdvantageConfig(baseline_std="population")
    np.testing.assert_allclose(
        _advs(group_rows(g, pop)), [0.8842595, 0.6737215, 0.8842595, -1.2211203, -1.2211203],
        atol=1e-5,
    )  # fmt: skip
    # Episode stats over returns [1, 0] (penalty on its row): mean 0.5, sample std 0.7071068
    # -> A rows [0.5, 0.4, 0.5] / 0.7071068, B -0.5 / 0.7071068.
    eps_stats = AdvantageConfig(baseline_stats="episodes")
    np.testing.assert_allclose(
        _advs(group_rows(g, eps_stats)), [0.7071068, 0.5656854, 0.7071068, -0.7071068, -0.7071068],
        atol=1e-5,
    )  # fmt: skip


def test_gigpo_as_the_reference_computes():
    g = _episodes_group("gigpo")
    cfg = AdvantageConfig(gamma=0.5)
    # Before: rewards A [0, -0.1, 1] -> returns (gamma 0.5) [0.2, 0.4, 1]; B [0, 0].
    # Anchors s0 {0.2, 0} -> +-1; s1 {0.4, 1} -> -1, +1; s2 singleton -> 0. Episode term +-1.
    today = _TODAY.model_copy(update={"gamma": 0.5})
    np.testing.assert_allclose(_advs(group_rows(g, today)), [2, 0, 2, -2, -1], atol=5e-5)
    # Reference (defaults): returns of the rewards without the penalty [0.25, 0.5, 1], then the
    # invalid row's penalty: [0.25, 0.4, 1]; B [0, 0].
    # Step term, sample std: s0 {0.25, 0}: mean 0.125, std sqrt(2 * 0.125^2 / 1) = 0.1767767 -> +-0.7071068;
    # s1 {0.4, 1}: mean 0.7, std sqrt(2 * 0.3^2) = 0.4242641 -> -0.7071068, +0.7071068; s2 -> 0.
    # Episode term as in the GRPO test: [0.7909058, 0.6025949, 0.7909058], [-1.0922032, -1.0922032].
    # By hand [1.4980126, -0.1045119, 1.4980126, -1.7993100, -1.0922032]; the reference
    # (mode mean_std_norm, its ALFWorld setting):
    expected = [1.4980069, -0.1045114, 1.4980092, -1.7993039, -1.0922011]
    np.testing.assert_allclose(_advs(group_rows(g, cfg)), expected, atol=1e-6)
    # GiGPO's mean_norm (norm_gigpo: mean): episode [0.42, 0.32, 0.42], [-0.58, -0.58];
    # step s0 +-0.125, s1 -0.3, +0.3 -> [0.545, 0.02, 0.72], [-0.705, -0.58] (the reference's too).
    mean = cfg.model_copy(update={"norm_gigpo": "mean"})
    np.testing.assert_allclose(
        _advs(group_rows(g, mean)), [0.545, 0.02, 0.72, -0.705, -0.58], atol=1e-9
    )
