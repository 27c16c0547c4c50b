"""Hand-computed checks of the policy loss (spo3/learner/loss.py)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from spo3.learner.loss import (
    LossConfig,
    k3_kl,
    masked_mean,
    policy_loss,
    token_entropy,
    token_logprobs,
)

NO_KL = LossConfig(clip=0.2, kl_coef=0.0, entropy_coef=0.0)


def test_loss_config_defaults_and_frozen():
    cfg = LossConfig()
    assert (cfg.clip, cfg.kl_coef, cfg.entropy_coef) == (0.2, 0.01, 0.0)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.clip = 0.3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="kl_cof"):
        LossConfig(kl_cof=0.1)  # a misspelt coefficient is an error, not a default


def test_masked_mean():
    # (1 + 2 + 4) / 3 masked-in tokens; empty mask -> divide by 1, not by 0
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_on_policy_loss_is_minus_mean_advantage_and_zero_kl():
    # ratio == 1, ref == logprobs. Masked tokens: row 0 has 2 with A=1, row 1 has 3 with A=-2.
    # masked_mean(A) = (2*1 + 3*(-2)) / 5 = -4/5 -> loss = 0.8
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    loss, m = policy_loss(logp, logp.clone(), logp.clone(), adv, mask, LossConfig())
    assert loss.item() == pytest.approx(0.8, abs=1e-6)
    assert m["pg_loss"] == pytest.approx(0.8, abs=1e-6)
    assert m["kl"] == 0.0
    assert m["clip_frac"] == 0.0
    assert m["ratio_mean"] == pytest.approx(1.0)
    assert m["approx_kl_old"] == 0.0
    assert m["n_tokens"] == 5.0
    assert "entropy" not in m


def _clip_case():
    # Four tokens, one row, kl off. log(ratio) = logp - old.
    #  t0: A=+1, ratio 1.5 > 1.2 -> clipped:   -min(1.5, 1.2)   = -1.2, grad 0
    #  t1: A=+1, ratio 0.5 < 0.8 -> unclipped: -min(0.5, 0.8)   = -0.5, d/dlogp = -ratio*A = -0.5
    #  t2: A=-1, ratio 0.5 < 0.8 -> clipped:   -min(-0.5, -0.8) =  0.8, grad 0
    #  t3: A=-1, ratio 1.5 > 1.2 -> unclipped: -min(-1.5, -1.2) =  1.5, d/dlogp = -ratio*A = +1.5
    # loss = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.6 / 4 = 0.15; grads / 4 tokens
    old = torch.full((1, 4), -1.0)
    log_r = torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)]])
    logp = (old + log_r).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    return logp, old, adv, log_r


def test_clipping_loss_and_gradients():
    logp, old, adv, log_r = _clip_case()
    mask = torch.ones(1, 4)
    loss, m = policy_loss(logp, old, logp.detach(), adv, mask, NO_KL)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    loss.backward()
    grad = logp.grad[0]
    assert grad[0].item() == 0.0 and grad[2].item() == 0.0  # clipped tokens: no gradient
    assert grad[1].item() == pytest.approx(-0.5 / 4, abs=1e-6)
    assert grad[3].item() == pytest.approx(1.5 / 4, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(0.5)  # t0 and t2
    assert m["ratio_mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5) / 4, abs=1e-6)
    # 0.5 * mean(d^2) = 0.5 * (2*ln1.5^2 + 2*ln2^2) / 4
    expected = 0.5 * (math.log(1.5) ** 2 + math.log(2) ** 2) / 2
    assert m["approx_kl_old"] == pytest.approx(expected, abs=1e-6)


def test_ratio_inside_clip_range_has_full_gradient():
    # ratio 1.1 in [0.8,1.2]: loss = -1.1*A, d/dlogp = -1.1*A for both signs (ties in min split evenly)
    old = torch.zeros(1, 2)
    logp = torch.full((1, 2), math.log(1.1)).requires_grad_(True)
    adv = torch.tensor([[2.0, -3.0]])
    loss, m = policy_loss(logp, old, logp.detach(), adv, torch.ones(1, 2), NO_KL)
    # (-1.1*2 + 1.1*3) / 2 = 0.55
    assert loss.item() == pytest.approx(0.55, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.1, 1.65]]))  # -1.1*A/2
    assert m["clip_frac"] == 0.0


def test_masked_tokens_contribute_nothing():
    torch.manual_seed(0)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])  # prompt tokens and right padding at 0
    base = [torch.randn(2, 5) - 1.0 for _ in range(3)]
    adv = torch.randn(2, 5)
    cfg = LossConfig(clip=0.2, kl_coef=0.1, entropy_coef=0.01)
    ent = torch.rand(2, 5)

    def run(noise: float):
        junk = ~mask.bool()
        lp, old, ref = (torch.where(junk, t + noise, t) for t in base)
        a = torch.where(junk, adv * 7 + noise, adv)
        e = torch.where(junk, ent + noise, ent)
        lp = lp.clone().requires_grad_(True)
        loss, m = policy_loss(lp, old, ref, a, mask, cfg, entropy=e)
        loss.backward()
        return loss.item(), lp.grad, m

    l0, g0, m0 = run(0.0)
    l1, g1, m1 = run(5.0)
    assert l0 == pytest.approx(l1, abs=1e-7)
    assert {k: float(v) for k, v in m0.items()} == pytest.approx(
        {k: float(v) for k, v in m1.items()}
    )
    assert torch.all(g0[~mask.bool()] == 0) and torch.all(g1[~mask.bool()] == 0)
    torch.testing.assert_close(g0, g1)
    assert m0["n_tokens"] == 6.0


def test_nonfinite_values_in_masked_slots_do_not_leak():
    mask = torch.tensor([[1, 1, 0]])
    lp = torch.tensor([[-1.0, -2.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.0, -2.0, float("nan")]])
    adv = torch.tensor([[1.0, 1.0, float("nan")]])
    loss, _ = policy_loss(lp, old, ref, adv, mask, LossConfig())
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert torch.isfinite(lp.grad).all()


def test_k3_hand_values():
    # logp=-1, ref=-2: d = -1 -> exp(-1) + 1 - 1 = 0.36787944
    assert k3_kl(torch.tensor(-1.0), torch.tensor(-2.0)).item() == pytest.approx(
        0.36787944, abs=1e-7
    )
    # d = +1 -> e - 1 - 1 = 0.71828183
    assert k3_kl(torch.tensor(-2.0), torch.tensor(-1.0)).item() == pytest.approx(
        0.71828183, abs=1e-6
    )
    assert k3_kl(torch.tensor(-3.0), torch.tensor(-3.0)).item() == 0.0


_logp = st.floats(min_value=-60.0, max_value=0.0, allow_nan=False)


@settings(deadline=None)  # the first torch call can be slow
@given(_logp, _logp)
def test_k3_is_nonnegative(logp, ref):
    for dtype in (torch.float32, torch.float64):
        kl = k3_kl(torch.tensor(logp, dtype=dtype), torch.tensor(ref, dtype=dtype))
        assert kl.item() >= 0.0


@settings(deadline=None)
@given(st.floats(-1e6, 1e6, allow_nan=False), st.floats(-1e6, 1e6, allow_nan=False))
def test_k3_is_nonnegative_any_floats(logp, ref):
    assert k3_kl(torch.tensor(logp), torch.tensor(ref)).item() >= 0.0


def test_kl_penalty_enters_loss():
    # A = 0 -> pg term 0; logp=-1, ref=-2 on both masked tokens -> k3 = 0.36787944
    # loss = 0.5 * 0.36787944 = 0.18393972
    logp = torch.tensor([[-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-2.0, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    cfg = LossConfig(kl_coef=0.5)
    loss, m = policy_loss(logp, logp.clone(), ref, torch.zeros(1), mask, cfg)
    assert m["kl"] == pytest.approx(0.36787944, abs=1e-6)
    assert loss.item() == pytest.approx(0.18393972, abs=1e-6)


def test_entropy_bonus_lowers_loss():
    # masked entropy mean = (1 + 2) / 2 = 1.5; coef 0.1 -> loss lower by 0.15
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1, 1, 0]])
    ent = torch.tensor([[1.0, 2.0, 99.0]])
    adv = torch.tensor([0.7])
    base, m_base = policy_loss(
        logp, logp, logp, adv, mask, LossConfig(entropy_coef=0.0), entropy=ent
    )
    bonus, m = policy_loss(logp, logp, logp, adv, mask, LossConfig(entropy_coef=0.1), entropy=ent)
    assert m["entropy"] == pytest.approx(1.5) and m_base["entropy"] == pytest.approx(1.5)
    assert base.item() - bonus.item() == pytest.approx(0.15, abs=1e-6)
    no_ent, _ = policy_loss(logp, logp, logp, adv, mask, LossConfig(entropy_coef=0.1))
    assert no_ent.item() == pytest.approx(base.item())


def test_row_advantages_equal_broadcast():
    torch.manual_seed(1)
    lp, old, ref = (torch.randn(3, 4) - 1 for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.5, 2.0])
    cfg = LossConfig(entropy_coef=0.0)
    l_row, m_row = policy_loss(lp, old, ref, adv, mask, cfg)
    l_tok, m_tok = policy_loss(lp, old, ref, adv[:, None].expand(3, 4).clone(), mask, cfg)
    assert l_row.item() == pytest.approx(l_tok.item())
    assert {k: float(v) for k, v in m_row.items()} == pytest.approx(
        {k: float(v) for k, v in m_tok.items()}
    )


def test_token_logprobs_matches_manual_log_softmax():
    # logits [1,2,3]: logsumexp = 3 + ln(1 + e^-1 + e^-2) = 3.40760596
    # token 0 -> 1 - 3.40760596 = -2.40760596 ; token 2 -> -0.40760596
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], dtype=torch.bfloat16)
    ids = torch.tensor([[0, 1]])
    out = token_logprobs(logits, ids)
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    lse = 3 + math.log(1 + math.exp(-1) + math.exp(-2))
    assert out[0, 0].item() == pytest.approx(1 - lse, abs=1e-6)
    assert out[0, 1].item() == pytest.approx(-math.log(3), abs=1e-6)  # uniform over 3
    assert token_logprobs(logits, torch.tensor([[2, 2]]))[0, 0].item() == pytest.approx(
        3 - lse, abs=1e-6
    )


def test_token_entropy():
    # uniform over 4 -> ln 4 = 1.3862944; one-hot-ish (huge gap) -> ~0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    ent = token_entropy(logits)
    assert ent.shape == (1, 2)
    assert ent[0, 0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert ent[0, 1].item() == pytest.approx(0.0, abs=1e-6)
