"""The 3SPO rollout (ALGORITHM.md sections 2, 3, 6) and the GRPO/GiGPO baselines, with one
budget accounting so that comparisons are fair.

3SPO: ranked backtracking DFS. Pop a node, restore the environment to it, ask the score store
for n(s), sample n actions in one policy request, step one environment copy per distinct
action, reward each child with the step reward, emit the children as a group (n > 1), and push
the non-terminal children so the best one is expanded next. Every leaf (terminal, truncated,
depth or budget limit) is committed to the score store once, under a stable leaf id.

GRPO/GiGPO: G full episodes per task from the root, one group of G members.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from actors.envs.base import Env, Observation, StepResult
from actors.prompts import ParsedAction, build_messages, parse_action
from score_store.score_math import ScoreParams, step_reward
from score_store.state_key import KeyScope, state_key
from score_store.store import ScoreStore
from services.contracts import Algo, Completion, Group, GroupMember, SamplingParams, Transition, WorkItem
from services.policy.interface import Policy


class GroupSink(Protocol):
    def append(self, group: Group) -> Any: ...


class ReplayMismatch(RuntimeError):
    """Resetting and replaying an action prefix did not reproduce the recorded state."""


@dataclass(frozen=True)
class RolloutConfig:
    algo: Algo = "3spo"
    max_steps: int = 15
    """Deepest path (actions from the root)."""
    env_step_budget: int | None = None
    """New environment steps per task; None = g_max * max_steps, what G_max GRPO episodes may use."""
    max_leaves: int = 64
    group_size: int = 8
    """G, the episodes per task of GRPO/GiGPO."""
    history_len: int = 3
    temperature: float = 1.0
    max_tokens: int = 64
    choice_mode: bool = False
    """Constrained sampling: the policy picks among the admissible actions (small models)."""
    key_scope: KeyScope = "task"

    def budget(self, g_max: int) -> int:
        return self.env_step_budget if self.env_step_budget is not None else g_max * self.max_steps


@dataclass
class RolloutStats:
    env_steps: int = 0
    replay_steps: int = 0
    leaves: int = 0
    successes: int = 0
    groups: int = 0
    invalid_actions: int = 0
    actions: int = 0
    truncated: int = 0
    generated_tokens: int = 0
    visited: set[str] = field(default_factory=set)
    branching: Counter = field(default_factory=Counter)
    scores: list[float] = field(default_factory=list)
    invalid_reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    complete: bool = True
    """False when the rollout was stopped early (SIGTERM): the task should run again."""


@dataclass
class _Node:
    node_id: str
    actions: tuple[str, ...]
    keys: tuple[str, ...]
    obs: Observation
    history: tuple[tuple[str, str], ...]
    snapshot: Any | None = None

    @property
    def key(self) -> str:
        return self.keys[-1]

    @property
    def depth(self) -> int:
        return len(self.actions)


class Rollout:
    """Rolls out one work item. Holds no state that matters after `run` returns."""

    def __init__(self, env: Env, policy: Policy, store: ScoreStore, sink: GroupSink, params: ScoreParams,
                 cfg: RolloutConfig, *, run: str = "default",
                 heartbeat: Callable[[], None] = lambda: None,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.env, self.policy, self.store, self.sink = env, policy, store, sink
        self.params, self.cfg, self.run_id = params, cfg, run
        self.heartbeat, self.should_stop = heartbeat, should_stop

    # --- entry -----------------------------------------------------------------------
    def run(self, item: WorkItem) -> RolloutStats:
        start = time.perf_counter()
        self.item = item
        self.stats = RolloutStats()
        self._leaf_seq = 0
        self._at: str | None = None
        obs = self.env.reset(item.task_id)
        self._at = "r"
        self.task_text = obs.text
        root = _Node("r", (), (self._key(obs),), obs, (), self.env.snapshot())
        self.stats.visited.add(root.key)
        if item.algo == "3spo":
            self._dfs(root)
        else:
            self._episodes(root)
        self.stats.seconds = time.perf_counter() - start
        return self.stats

    def _key(self, obs: Observation) -> str:
        return state_key(self.env.name, self.item.task_id, obs.state_text, self.cfg.key_scope)

    # --- 3SPO ------------------------------------------------------------------------
    def _dfs(self, root: _Node) -> None:
        cfg, stats = self.cfg, self.stats
        budget = cfg.budget(self.params.g_max)
        stack = [root]
        while stack and stats.leaves < cfg.max_leaves and not self.should_stop():
            node = stack.pop()
            if node.depth >= cfg.max_steps:
                self._commit(node.keys, 0.0)
                continue
            if stats.env_steps >= budget:
                self._commit(node.keys, 0.0)  # budget limit: this node is a leaf
                break
            current = self.store.scores([node.key]).scores[0]
            n = current.n_rollouts
            stats.branching[n] += 1
            stats.scores.append(current.score)
            if n == 0:
                stats.truncated += 1
                self._commit(node.keys, 0.0)
                continue
            completions = self._sample(node, n)
            parsed = [self._parse(c, node) for c in completions]
            # Step at most what the budget has left; replies for actions beyond it are dropped.
            distinct = list(dict.fromkeys(p.action for p in parsed if not p.invalid))[: budget - stats.env_steps]
            kept = [(c, p) for c, p in zip(completions, parsed) if p.invalid or p.action in distinct]
            completions, parsed = [c for c, _ in kept], [p for _, p in kept]
            outcomes = {a: self._step_from(node, a, f"{node.node_id}.{i}") for i, a in enumerate(distinct)}
            child_keys = list(dict.fromkeys(k for _, k, _ in outcomes.values()))
            after = {s.key: s for s in self.store.scores(child_keys).scores} if child_keys else {}
            members, reward_of = [], {}
            for c, p in zip(completions, parsed):
                if p.invalid:
                    r = step_reward(score_before=current.score, score_after=current.score,
                                    n_total_before=current.n_total, changed_state=False, success=None,
                                    invalid=True, p=self.params)
                    members.append(self._member(node, c, p, node.key, r, done=False))
                    continue
                result, child_key, _ = outcomes[p.action]
                r = step_reward(score_before=current.score, score_after=after[child_key].score,
                                n_total_before=current.n_total, changed_state=child_key != node.key,
                                success=result.success if result.done else None, invalid=False,
                                p=self.params)
                reward_of[p.action] = r
                members.append(self._member(node, c, p, child_key, r, done=result.done))
            if len(members) > 1:
                self._emit(node, members)
            children = []
            for i, action in enumerate(distinct):
                result, child_key, snap = outcomes[action]
                child = _Node(f"{node.node_id}.{i}", node.actions + (action,), node.keys + (child_key,),
                              result.observation, node.history + ((action, result.observation.text),), snap)
                if result.done:
                    self._commit(child.keys, result.success)
                else:
                    children.append((reward_of[action], child))
            if not distinct:
                self._commit(node.keys, 0.0)  # every reply invalid: nothing to expand
            # Best child on top of the stack: it is expanded next.
            stack.extend(child for _, child in sorted(children, key=lambda rc: rc[0]))
            self.heartbeat()
        if self.should_stop():
            self.stats.complete = False  # the task goes back to the queue; its open paths are not leaves
            return
        for node in stack:  # paths cut by the budget or the leaf limit end here
            if stats.leaves >= cfg.max_leaves:
                break
            self._commit(node.keys, 0.0)

    # --- GRPO / GiGPO -----------------------------------------------------------------
    def _episodes(self, root: _Node) -> None:
        cfg, stats = self.cfg, self.stats
        members = []
        for g in range(cfg.group_size):
            if self.should_stop():
                self.stats.complete = False  # an incomplete group is worthless to GRPO: emit nothing
                return
            node, transitions, success = root, [], 0.0
            while node.depth < cfg.max_steps:
                c = self._sample(node, 1)[0]
                p = self._parse(c, node)
                if p.invalid:
                    # An invalid reply costs a turn ("" in the action prefix) but no environment step.
                    transitions.append(self._transition(node, c, p, node.key, -self.params.invalid_penalty, False))
                    node = _Node(node.node_id, node.actions + ("",), node.keys + (node.key,), node.obs,
                                 node.history, node.snapshot)
                    continue
                child_id = f"{node.node_id}.{g}"
                result, child_key, snap = self._step_from(node, p.action, child_id)
                reward = result.success if result.done else 0.0
                transitions.append(self._transition(node, c, p, child_key, reward, result.done))
                node = _Node(child_id, node.actions + (p.action,), node.keys + (child_key,),
                             result.observation, node.history + ((p.action, result.observation.text),), snap)
                if result.done:
                    success = result.success
                    break
            self._commit(node.keys, success)
            members.append(GroupMember(transitions=transitions, score=sum(t.reward for t in transitions)))
            self.heartbeat()
        group = Group(group_id=self._group_id(root), run=self.run_id, algo=self.item.algo, task_id=self.item.task_id,
                      node_id=root.node_id, depth=0, members=members, created_at=time.time())
        self.sink.append(group)
        stats.groups += 1

    # --- pieces ----------------------------------------------------------------------
    def _sample(self, node: _Node, n: int) -> list[Completion]:
        admissible = list(node.obs.admissible_actions)
        messages = build_messages(self.task_text, node.history, node.obs.text, admissible,
                                  history_len=self.cfg.history_len)
        params = SamplingParams(n=n, temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens,
                                choices=admissible if self.cfg.choice_mode and admissible else None)
        completions = self.policy.sample(messages, params)
        self.stats.generated_tokens += sum(len(c.token_ids) for c in completions)
        return completions

    def _parse(self, c: Completion, node: _Node) -> ParsedAction:
        p = parse_action(c.text, node.obs.admissible_actions, bare_ok=self.cfg.choice_mode)
        self.stats.actions += 1
        if p.invalid:
            self.stats.invalid_actions += 1
            self.stats.invalid_reasons[p.reason] += 1
        return p

    def _goto(self, node: _Node) -> None:
        """Put the environment in `node`'s state: restore a snapshot, else reset and replay."""
        if self._at == node.node_id:
            return
        if node.snapshot is not None:
            obs = self.env.restore(node.snapshot)
        else:
            obs = self.env.reset(self.item.task_id)
            for action in node.actions:
                if action:  # "" marks an invalid turn (no environment step)
                    obs = self.env.step(action).observation
                    self.stats.replay_steps += 1
        if self._key(obs) != node.key:
            raise ReplayMismatch(f"restoring node {node.node_id} of task {self.item.task_id} gave another state "
                                 f"than recorded; the environment is not deterministic under replay")
        self._at = node.node_id

    def _step_from(self, node: _Node, action: str, child_id: str) -> tuple[StepResult, str, Any | None]:
        self._goto(node)
        result = self.env.step(action)
        self._at = child_id
        self.stats.env_steps += 1
        key = self._key(result.observation)
        self.stats.visited.add(key)
        snap = None if result.done else self.env.snapshot()
        return result, key, snap

    def _transition(self, node: _Node, c: Completion, p: ParsedAction, next_key: str, reward: float,
                    done: bool) -> Transition:
        # How it was sampled (as in _sample): the learner scores the same constrained distribution.
        choices = list(node.obs.admissible_actions) if self.cfg.choice_mode and node.obs.admissible_actions else None
        return Transition(state_key=node.key, next_state_key=next_key, prompt_token_ids=c.prompt_token_ids or [],
                          token_ids=c.token_ids, logprobs=c.logprobs, action=p.action, invalid=p.invalid,
                          reward=reward, done=done, policy_version=c.policy_version, choices=choices,
                          choice_token_ids=c.choice_token_ids if choices else None)

    def _member(self, node, c, p, next_key, reward, done) -> GroupMember:
        return GroupMember(transitions=[self._transition(node, c, p, next_key, reward, done)], score=reward)

    def _group_id(self, node: _Node) -> str:
        return f"{self.item.item_id}:a{self.item.attempt}:{node.node_id}"

    def _emit(self, node: _Node, members: Sequence[GroupMember]) -> None:
        group = Group(group_id=self._group_id(node), run=self.run_id, algo="3spo", task_id=self.item.task_id,
                      node_id=node.node_id, depth=node.depth, members=list(members), created_at=time.time())
        self.sink.append(group)
        self.stats.groups += 1

    def _commit(self, keys: Sequence[str], success: float) -> None:
        leaf_id = f"{self.item.item_id}:a{self.item.attempt}:{self._leaf_seq}"
        self._leaf_seq += 1
        self.store.commit_leaf(leaf_id, list(keys), success)
        self.stats.leaves += 1
        self.stats.successes += int(success >= 1.0)
