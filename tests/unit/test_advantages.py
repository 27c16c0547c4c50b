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
