"""The actor's rule for score parameters when it uses the score service (pure)."""

import pytest

from spo3.score_store.client import ParamsMismatch, reconcile_params
from spo3.score_store.score_math import ScoreParams


def test_service_parameters_are_taken_when_none_were_given():
    served = ScoreParams(alpha=50.0, g_max=4, xi=3)
    assert reconcile_params(ScoreParams(), served) == served


def test_explicit_parameters_must_agree_and_each_difference_is_named():
    served = ScoreParams(alpha=50.0, g_max=4)
    assert reconcile_params(ScoreParams(alpha=50.0), served) == served  # agrees: fine
    with pytest.raises(ParamsMismatch) as e:
        reconcile_params(ScoreParams(alpha=2.0, g_max=4, omega_k=0.5), served, source="svc")
    msg = str(e.value)
    assert "alpha: actor 2.0, service 50.0" in msg and "omega_k: actor 0.5, service 0.1" in msg
    assert "g_max" not in msg and "svc" in msg


def test_a_default_given_explicitly_still_counts_as_given():
    # --g-max 8 on the command line against a service with g_max 4: refused, though 8 is the default.
    with pytest.raises(ParamsMismatch, match="g_max: actor 8, service 4"):
        reconcile_params(ScoreParams(g_max=8), ScoreParams(g_max=4))
