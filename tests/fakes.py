"""Fakes of every interface, for unit tests of pure logic. Each boundary also has tests against
the real part (real Redis, real vLLM, real game engines)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence

from spo3.actors.envs.base import EnvError, Observation, StepResult
from spo3.score_store.score_math import Counts, ScoreParams, n_rollouts, state_score
from spo3.score_store.store import CommitResult, LeafOutcome, ScoreBatch, StateScore, StoreStats
from spo3.transport.contracts import ChatMessage, Completion, Group, SamplingParams


class LineWorld:
    """States 0..length on a line; 'forward' moves on, 'back' moves back, 'look' changes nothing.
    Reaching `length` wins; 'jump' ends the episode lost. Snapshots are the position."""

    name = "lineworld"

    def __init__(self, length: int = 4, snapshots: bool = True) -> None:
        self.length, self.snapshots = length, snapshots
        self.pos = 0
        self.steps = 0

    def _obs(self) -> Observation:
        actions = ("forward", "look", "jump") + (("back",) if self.pos > 0 else ())
        return Observation(
            text=f"You are at mile {self.pos}.",
            state_text=f"mile {self.pos}",
            admissible_actions=actions,
        )

    def reset(self, task_id: str) -> Observation:
        if not task_id.startswith("line"):
            raise EnvError(f"unknown task {task_id!r}")
        self.pos = 0
        return self._obs()

    def step(self, action: str) -> StepResult:
        self.steps += 1
        if action == "jump":
            return StepResult(self._obs(), done=True, success=0.0)
        self.pos = (
            min(self.length, self.pos + 1)
            if action == "forward"
            else max(0, self.pos - 1)
            if action == "back"
            else self.pos
        )
        won = self.pos == self.length
        return StepResult(
            self._obs(), done=won, success=1.0 if won else 0.0, raw_reward=10.0 if won else 0.0
        )

    def snapshot(self):
        return self.pos if self.snapshots else None

    def restore(self, snap) -> Observation:
        self.pos = snap
        return self._obs()

    def close(self) -> None:
        pass


class ScriptedPolicy:
    """Replies chosen by `script(messages, params, i)`; token ids are the reply's bytes."""

    def __init__(
        self, script: Callable[[Sequence[ChatMessage], SamplingParams, int], str], version: int = 0
    ):
        self.script, self.version = script, version
        self.requests: list[SamplingParams] = []

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        self.requests.append(params)
        out = []
        for i in range(params.n):
            text = self.script(messages, params, i)
            ids = list(text.encode("utf-8", "replace"))[: params.max_tokens] or [0]
            out.append(
                Completion(
                    text=text,
                    token_ids=ids,
                    logprobs=[-1.0] * len(ids),
                    finish_reason="stop",
                    policy_version=self.version,
                    prompt_token_ids=[1, 2, 3],
                )
            )
        return out


def random_actions(seed: int = 0):
    rng = random.Random(seed)

    def script(messages, params, i):
        if params.choices:
            return rng.choice(params.choices)
        admissible = (
            messages[-1].content.split("Admissible actions: ")[1].split("\n")[0].split(", ")
        )
        return f"<think>hm</think><action>{rng.choice(admissible)}</action>"

    return script


class ListSink:
    def __init__(self) -> None:
        self.groups: list[Group] = []

    def append(self, group: Group) -> str:
        self.groups.append(group)
        return group.group_id


class MemoryScoreStore:
    """The score store's semantics in a dict (same formula functions as the Redis store)."""

    def __init__(self, params: ScoreParams | None = None) -> None:
        self.params = params or ScoreParams()
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.roots: set[str] = set()
        self.leaf_ids: set[str] = set()
        self.commits: list[tuple[str, list[str], float]] = []

    def scores(self, keys: Sequence[str]) -> ScoreBatch:
        t = len(self.leaf_ids) + 1
        out = []
        for k in keys:
            n, s = self.counts.get(k, (0, 0))
            sc = state_score(Counts(n, s), t, self.params, is_root=k in self.roots)
            out.append(
                StateScore(
                    key=k,
                    score=sc,
                    n_rollouts=n_rollouts(sc, self.params.g_max),
                    n_total=n,
                    n_success=s,
                )
            )
        return ScoreBatch(t=t, scores=out)

    def commit_leaf(self, leaf_id: str, path: Sequence[str], success: float) -> CommitResult:
        if leaf_id in self.leaf_ids:
            return CommitResult(counted=False, t=len(self.leaf_ids) + 1)
        self.leaf_ids.add(leaf_id)
        self.commits.append((leaf_id, list(path), success))
        self.roots.add(path[0])
        for k in dict.fromkeys(path):
            self.counts[k][0] += 1
            self.counts[k][1] += int(success >= 1.0)
        return CommitResult(counted=True, t=len(self.leaf_ids) + 1)

    def commit_leaves(self, leaves: Sequence[LeafOutcome]) -> list[CommitResult]:
        return [self.commit_leaf(x.leaf_id, x.path, x.success) for x in leaves]

    def stats(self) -> StoreStats:
        return StoreStats(
            t=len(self.leaf_ids) + 1,
            n_states=len(self.counts),
            truncated_states=0,
            leaves_counted=len(self.leaf_ids),
            duplicate_commits=0,
        )
