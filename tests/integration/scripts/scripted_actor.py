"""An actor process with a deterministic policy (seeded random admissible actions), for tests
that compare paths or kill parts of the system: `python scripted_actor.py CONFIG_JSON`.

CONFIG_JSON holds ActorConfig's fields (rollout: RolloutConfig's; params: ScoreParams'), plus
`seed`. Prints one JSON line {"finished": N, "score_requests": R, "score_errors": E} on a clean exit."""

import json
import logging
import sys

from spo3.actors.rollout import RolloutConfig
from spo3.actors.worker import ActorConfig, run_actor
from spo3.score_store.score_math import ScoreParams
from tests.fakes import ScriptedPolicy, random_actions

logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
spec = json.loads(sys.argv[1])
seed = spec.pop("seed")
cfg = ActorConfig(
    **{
        **spec,
        "rollout": RolloutConfig(**spec.get("rollout", {})),
        "params": ScoreParams(**spec.get("params", {})),
    }
)
finished = run_actor(cfg, ScriptedPolicy(random_actions(seed)))
from spo3.transport.metrics import score_client_metrics  # noqa: E402

m = score_client_metrics()


def total(counter) -> float:
    return sum(s.value for f in counter.collect() for s in f.samples if s.name.endswith("_total"))


print(
    json.dumps(
        {"finished": finished, "score_requests": total(m.requests), "score_errors": total(m.errors)}
    ),
    flush=True,
)
