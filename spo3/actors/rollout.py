"""The 3SPO rollout (docs/algorithm.md "Rollout") and the GRPO/GiGPO baselines, with one
budget accounting so that comparisons are fair.

3SPO: ranked backtracking DFS. Pop a node, restore the environment to it, ask the score store
for n(s), sample n actions in one policy request, step one environment copy per distinct
action, reward each child with the step reward, emit the children as a group (n > 1), and push
the children worth expanding so the best one is expanded next.

What the DFS spends no budget on (docs/algorithm.md "Rollout"): a state key is expanded at most once
per rollout (a transposition set); a child that returns to a state on its path, or to a state
already expanded, stays a member of its group but is not pushed; a child that lands on a
truncated state (S = 0) is one failed leaf, committed when reached, never pushed.

Leaves are real path ends only (docs/algorithm.md "Leaf commit"): a terminal state, a truncated
state reached, or the depth limit, each committed to the score store once under a stable leaf id.
Nodes still on the stack when the budget or the leaf cap runs out are not leaves: they add no
statistics. `RolloutStats` carries the diagnostics that check these rules on every rollout.

GRPO/GiGPO: G full episodes per task from the root, one group of G members.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from spo3.actors.config import RolloutConfig
from spo3.actors.envs.base import Env, Observation, StepResult
from spo3.actors.prompts import ParsedAction, build_messages, parse_action
from spo3.policy.interface import Policy
from spo3.score_store.score_math import Counts, ScoreParams, step_reward
from spo3.score_store.state_key import state_key
from spo3.score_store.store import ScoreStore, StateScore
from spo3.transport.contracts import (
    Completion,
    Group,
    GroupMember,
    SamplingParams,
    Transition,
    WorkItem,
)
from spo3.transport.metrics import actor_metrics


class GroupSink(Protocol):
    def append(self, group: Group) -> Any: ...


class ReplayMismatch(RuntimeError):
    """Resetting and replaying an action prefix did not reproduce the recorded state."""


LEAF_KINDS = ("success", "failure", "truncated", "depth")
"""Kinds of leaves: terminal success, terminal failure (or partial success), truncated state reached,
depth limit."""


@dataclass
class RolloutStats:
    env_steps: int = 0
    replay_steps: int = 0
    """Environment steps spent restoring nodes by reset + replay (not counted in env_steps)."""
    restores: int = 0
    """Nodes restored by reset + replay (each one engine call with a batch-replaying adapter)."""
    leaves: int = 0
    successes: int = 0
    groups: int = 0
    invalid_actions: int = 0
    actions: int = 0
    truncated: int = 0
    generated_tokens: int = 0
    visited: set[str] = field(default_factory=set)
    visits: list[tuple[int, str]] = field(default_factory=list)
    """(env_steps of this rollout when entered, key) of each state in `visited`, in the order first
    entered (the root at 0): the run's visited-state curve (bench.compare.stats) comes from these."""
    branching: Counter = field(default_factory=Counter)
    scores: list[float] = field(default_factory=list)
    invalid_reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    complete: bool = True
    """False when the rollout was stopped early (SIGTERM): the task should run again."""
    # --- diagnostics of the DFS rules (docs/algorithm.md "Rollout", "Leaf commit") ---
    expansions: int = 0
    reexpansions: int = 0
    """Expansions of a key already expanded in this rollout (the transposition set keeps it 0)."""
    expansions_by_depth: Counter = field(default_factory=Counter)
    leaf_kinds: Counter = field(default_factory=Counter)
    """Leaves committed, by LEAF_KINDS."""
    informative_groups: int = 0
    """Groups whose rewards are not all equal (they carry a learning signal)."""
    truncated_top_groups: int = 0
    """Informative groups whose highest reward belongs to a child on a truncated state only."""
    not_pushed: Counter = field(default_factory=Counter)
    """Non-terminal children not pushed: on_path (returned to a state on its path), expanded (state
    already expanded in this rollout), duplicate (another action of the same expansion reached it)."""
    open_at_end: int = 0
    """Nodes left on the stack when the rollout ended (not leaves: no statistics)."""
    leaves_over_cap: int = 0
    """Path ends not committed because the rollout already had max_leaves leaves."""


_Outcome = tuple[StepResult, str, Any | None]
"""What stepping one action from a node gave: (result, child key, the child's snapshot or None)."""


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

    def __init__(
        self,
        env: Env,
        policy: Policy,
        store: ScoreStore,
        sink: GroupSink,
        params: ScoreParams,
        cfg: RolloutConfig,
        *,
        run: str = "default",
        heartbeat: Callable[[], object] = lambda: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
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
        self._visit(root.key)
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
        expanded: set[str] = set()  # the transposition set: keys expanded in this rollout
        self._dead_ends: set[str] = (
            set()
        )  # truncated states already committed as a leaf in this rollout
        stack = [root]
        while (
            stack
            and stats.leaves < cfg.max_leaves
            and stats.env_steps < budget
            and not self.should_stop()
        ):
            node = stack.pop()
            if node.key in expanded:  # reached by another path after it was pushed
                stats.not_pushed["expanded"] += 1
                continue
            stack.extend(self._expand(node, expanded, budget))
            self.heartbeat()
        if self.should_stop():
            self.stats.complete = False  # the task goes back to the queue
        # Nodes left on the stack are not leaves: nothing finished there
        # (docs/algorithm.md "Leaf commit").
        stats.open_at_end = len(stack)

    def _expand(self, node: _Node, expanded: set[str], budget: int) -> list[_Node]:
        """Expand `node` (n(s) actions, one group); returns the children to push, best last."""
        stats = self.stats
        current = self.store.scores([node.key]).scores[0]
        n = current.n_rollouts
        stats.branching[n] += 1
        stats.scores.append(current.score)
        if (
            n == 0
        ):  # truncated since it was pushed (commits of this or other rollouts): its path ends here
            self._dead_end(node.keys)
            return []
        stats.reexpansions += node.key in expanded
        expanded.add(node.key)
        stats.expansions += 1
        stats.expansions_by_depth[node.depth] += 1
        completions = self._sample(node, n)
        parsed = [self._parse(c, node) for c in completions]
        # Step at most what the budget has left; replies for actions beyond it are dropped.
        distinct = list(dict.fromkeys(p.action for p in parsed if p.action is not None))[
            : budget - stats.env_steps
        ]
        kept = [(c, p) for c, p in zip(completions, parsed) if p.invalid or p.action in distinct]
        outcomes = {
            a: self._step_from(node, a, f"{node.node_id}.{i}") for i, a in enumerate(distinct)
        }
        # One scoring of the parent and its children: every score of the group's rewards at the same t.
        batch = self.store.scores(
            list(dict.fromkeys([node.key, *(k for _, k, _ in outcomes.values())]))
        )
        scored = {s.key: s for s in batch.scores}
        reward_of = self._group(node, kept, outcomes, scored, batch.t)
        return self._children(node, distinct, outcomes, reward_of, scored, expanded)

    def _group(
        self,
        node: _Node,
        kept: Sequence[tuple[Completion, ParsedAction]],
        outcomes: dict[str, _Outcome],
        scored: dict[str, StateScore],
        t: int,
    ) -> dict[str, float]:
        """Reward the replies kept, emit them as `node`'s group (when more than one); returns the
        whole step reward of each distinct action (what orders the children)."""
        here = scored[node.key]

        def reward(
            next_key: str,
            success: float | None,
            invalid: bool,
            novelty: bool = True,
            dead_end: bool = False,
        ) -> float:
            after = scored[next_key]
            return step_reward(
                path=node.keys,
                next_key=next_key,
                before=_counts(here),
                after=_counts(after),
                t=t,
                success=success,
                invalid=invalid,
                p=self.params,
                before_truncated=here.n_rollouts == 0,
                after_truncated=after.n_rollouts == 0,
                novelty=novelty,
                dead_end=dead_end,
            )

        # The members' rewards (their advantages) leave the novelty term out under `novelty_use: order`;
        # the order of the children (which is expanded first) always uses the whole step reward.
        learn_novelty = self.params.novelty_use == "reward"

        members: list[GroupMember] = []
        rewards: list[tuple[float, bool]] = []
        reward_of: dict[str, float] = {}
        for c, p in kept:
            if p.action is None:
                r = reward(node.key, None, True, learn_novelty)
                members.append(self._member(node, c, p, node.key, r, done=False))
                rewards.append((r, False))
                continue
            result, child_key, _ = outcomes[p.action]
            success = result.success if result.done else None
            dead = self._dead_end_step(node, result, scored[child_key])
            r = reward(child_key, success, False, learn_novelty, dead)
            reward_of[p.action] = (
                r if learn_novelty else reward(child_key, success, False, dead_end=dead)
            )
            members.append(self._member(node, c, p, child_key, r, done=result.done))
            rewards.append((r, not result.done and scored[child_key].n_rollouts == 0))
        if len(members) > 1:
            self._emit(node, members)
            self._note_group(rewards)
        return reward_of

    def _dead_end_step(self, node: _Node, result: StepResult, child: StateScore) -> bool:
        """The step ends its path without a win: a losing terminal, a truncated state (S = 0) or the
        depth limit (`dead_end_novelty`, docs/algorithm.md "Step reward")."""
        if result.done:
            return result.success < 1.0
        return child.n_rollouts == 0 or node.depth + 1 >= self.cfg.max_steps

    def _children(
        self,
        node: _Node,
        distinct: Sequence[str],
        outcomes: dict[str, _Outcome],
        reward_of: dict[str, float],
        scored: dict[str, StateScore],
        expanded: set[str],
    ) -> list[_Node]:
        """Commit the children that end a path; returns those to push, best last."""
        stats = self.stats
        children: list[_Node] = []
        seen: set[str] = set()
        # Best child first, so that of two actions reaching one state the better-rewarded is kept.
        for i, action in sorted(enumerate(distinct), key=lambda ia: -reward_of[ia[1]]):
            result, child_key, snap = outcomes[action]
            child = _Node(
                f"{node.node_id}.{i}",
                node.actions + (action,),
                node.keys + (child_key,),
                result.observation,
                node.history + ((action, result.observation.text),),
                snap,
            )
            if result.done:
                self._commit(
                    child.keys, result.success, "success" if result.success >= 1.0 else "failure"
                )
            elif child_key in node.keys:
                stats.not_pushed["on_path"] += 1  # went nowhere new; its reward says so
            elif scored[child_key].n_rollouts == 0:
                self._dead_end(child.keys)  # never pushed
            elif child_key in expanded:
                stats.not_pushed["expanded"] += 1
            elif child_key in seen:
                stats.not_pushed["duplicate"] += 1
            elif child.depth >= self.cfg.max_steps:
                seen.add(child_key)
                self._commit(child.keys, 0.0, "depth")
            else:
                seen.add(child_key)
                children.append(child)
        return children[::-1]  # best child on top of the stack: it is expanded next

    def _dead_end(self, keys: tuple[str, ...]) -> None:
        """A path reached a truncated state: one failed leaf per such state and rollout."""
        self.stats.truncated += 1
        if keys[-1] not in self._dead_ends:
            self._dead_ends.add(keys[-1])
            self._commit(keys, 0.0, "truncated")

    def _note_group(self, rewards: Sequence[tuple[float, bool]]) -> None:
        """Diagnostics of one emitted group: (reward, lands on a truncated state) per member."""
        values = [r for r, _ in rewards]
        if max(values) - min(values) <= 1e-12:
            return
        self.stats.informative_groups += 1
        best_dead = max((r for r, dead in rewards if dead), default=None)
        best_alive = max((r for r, dead in rewards if not dead), default=None)
        if best_dead is not None and (best_alive is None or best_dead > best_alive + 1e-12):
            self.stats.truncated_top_groups += 1

    # --- GRPO / GiGPO -----------------------------------------------------------------
    def _episodes(self, root: _Node) -> None:
        cfg, stats = self.cfg, self.stats
        members = []
        for g in range(cfg.group_size):
            if self.should_stop():
                self.stats.complete = (
                    False  # an incomplete group is worthless to GRPO: emit nothing
                )
                return
            node, transitions, success, kind = root, [], 0.0, "depth"
            while node.depth < cfg.max_steps:
                c = self._sample(node, 1)[0]
                p = self._parse(c, node)
                if p.action is None:
                    # An invalid reply costs a turn ("" in the action prefix) but no environment step.
                    transitions.append(
                        self._transition(node, c, p, node.key, -self.params.invalid_penalty, False)
                    )
                    node = _Node(
                        node.node_id,
                        node.actions + ("",),
                        node.keys + (node.key,),
                        node.obs,
                        node.history,
                        node.snapshot,
                    )
                    continue
                child_id = f"{node.node_id}.{g}"
                result, child_key, snap = self._step_from(node, p.action, child_id, keep=False)
                reward = result.success if result.done else 0.0
                transitions.append(self._transition(node, c, p, child_key, reward, result.done))
                node = _Node(
                    child_id,
                    node.actions + (p.action,),
                    node.keys + (child_key,),
                    result.observation,
                    node.history + ((p.action, result.observation.text),),
                    snap,
                )
                if result.done:
                    success, kind = (
                        result.success,
                        "success" if result.success >= 1.0 else "failure",
                    )
                    break
            self._commit(node.keys, success, kind)
            members.append(
                GroupMember(transitions=transitions, score=sum(t.reward for t in transitions))
            )
            self.heartbeat()
        group = Group(
            group_id=self._group_id(root),
            run=self.run_id,
            algo=self.item.algo,
            task_id=self.item.task_id,
            node_id=root.node_id,
            depth=0,
            members=members,
            created_at=time.time(),
        )
        self.sink.append(group)
        stats.groups += 1

    # --- pieces ----------------------------------------------------------------------
    def _sample(self, node: _Node, n: int) -> list[Completion]:
        admissible = list(node.obs.admissible_actions)
        messages = build_messages(
            self.task_text,
            node.history,
            node.obs.text,
            admissible,
            history_len=self.cfg.history_len,
        )
        params = SamplingParams(
            n=n,
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
            choices=admissible if self.cfg.choice_mode and admissible else None,
        )
        with actor_metrics().policy_in_flight.track_inprogress():  # autoscaling signal
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
            actions = self._replayed(node)
            replay = getattr(self.env, "replay", None)
            if replay is not None:  # the adapter resets and replays in one engine call
                obs = replay(self.item.task_id, actions)
            else:
                obs = self.env.reset(self.item.task_id)
                for action in actions:
                    obs = self.env.step(action).observation
        self._arrived(node, obs)

    def _replayed(self, node: _Node) -> list[str]:
        """The actions that reset + replay steps to restore `node` (counted as replay)."""
        actions = [a for a in node.actions if a]  # "" marks an invalid turn (no environment step)
        self.stats.replay_steps += len(actions)
        self.stats.restores += 1
        return actions

    def _arrived(self, node: _Node, obs: Observation) -> None:
        if self._key(obs) != node.key:
            raise ReplayMismatch(
                f"restoring node {node.node_id} of task {self.item.task_id} gave another state "
                f"than recorded; the environment is not deterministic under replay"
            )
        self._at = node.node_id

    def _step_from(self, node: _Node, action: str, child_id: str, *, keep: bool = True) -> _Outcome:
        """Step `action` from `node`; (result, child key, the child's snapshot if `keep` and the
        engine has snapshots: GRPO/GiGPO episodes never come back to a child)."""
        step_from = getattr(self.env, "step_from", None)
        replay_step = getattr(self.env, "replay_step", None)
        here = self._at == node.node_id
        if step_from is not None and (here or node.snapshot is not None):
            # Restore the snapshot (unless already there), step and snapshot the child: one engine call.
            result, snap = step_from(None if here else node.snapshot, action, save=keep)
        elif not here and node.snapshot is None and replay_step is not None:
            # Restore and step in one engine call; the restored state is still checked.
            obs, result = replay_step(self.item.task_id, self._replayed(node), action)
            self._arrived(node, obs)
            snap = None if result.done or not keep else self.env.snapshot()
        else:
            self._goto(node)
            result = self.env.step(action)
            snap = None if result.done or not keep else self.env.snapshot()
        self._at = child_id
        self.stats.env_steps += 1
        key = self._key(result.observation)
        self._visit(key)
        return result, key, snap

    def _visit(self, key: str) -> None:
        if key not in self.stats.visited:
            self.stats.visited.add(key)
            self.stats.visits.append((self.stats.env_steps, key))

    def _transition(
        self, node: _Node, c: Completion, p: ParsedAction, next_key: str, reward: float, done: bool
    ) -> Transition:
        # How it was sampled (as in _sample): the learner scores the same constrained distribution.
        choices = (
            list(node.obs.admissible_actions)
            if self.cfg.choice_mode and node.obs.admissible_actions
            else None
        )
        return Transition(
            state_key=node.key,
            next_state_key=next_key,
            prompt_token_ids=c.prompt_token_ids or [],
            token_ids=c.token_ids,
            logprobs=c.logprobs,
            action=p.action,
            invalid=p.invalid,
            reward=reward,
            done=done,
            policy_version=c.policy_version,
            choices=choices,
            choice_token_ids=c.choice_token_ids if choices else None,
            # Greedy decoding reports the model's own (T = 1) log-probs.
            temperature=self.cfg.temperature or 1.0,
        )

    def _member(self, node, c, p, next_key, reward, done) -> GroupMember:
        return GroupMember(
            transitions=[self._transition(node, c, p, next_key, reward, done)], score=reward
        )

    def _group_id(self, node: _Node) -> str:
        return f"{self.item.item_id}:a{self.item.attempt}:{node.node_id}"

    def _emit(self, node: _Node, members: Sequence[GroupMember]) -> None:
        group = Group(
            group_id=self._group_id(node),
            run=self.run_id,
            algo="3spo",
            task_id=self.item.task_id,
            node_id=node.node_id,
            depth=node.depth,
            members=list(members),
            created_at=time.time(),
        )
        self.sink.append(group)
        self.stats.groups += 1

    def _commit(self, keys: Sequence[str], success: float, kind: str) -> None:
        if self.item.algo == "3spo" and self.stats.leaves >= self.cfg.max_leaves:
            self.stats.leaves_over_cap += 1
            return
        leaf_id = f"{self.item.item_id}:a{self.item.attempt}:{self._leaf_seq}"
        self._leaf_seq += 1
        self.store.commit_leaf(leaf_id, list(keys), success)
        self.stats.leaves += 1
        self.stats.leaf_kinds[kind] += 1
        self.stats.successes += int(success >= 1.0)


def _counts(s: StateScore) -> Counts:
    return Counts(s.n_total, s.n_success)
