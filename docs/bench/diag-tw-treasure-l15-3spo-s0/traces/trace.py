"""Trace held-out episodes of a kept version: actions taken (for diagnosis)."""
import sys, collections, yaml, torch
from pathlib import Path
from safetensors.torch import load_file
from services.app.launcher import task_lists
from services.app.launcher import TrainConfig
from actors.envs.registry import make_env
from actors.prompts import build_messages, parse_action
from services.transport.contracts import SamplingParams
from services.policy.inprocess import InProcessPolicy

run = Path(sys.argv[1]); version = int(sys.argv[2]); ntasks = int(sys.argv[3]) if len(sys.argv) > 3 else 4
temp = float(sys.argv[4]) if len(sys.argv) > 4 else 0.4
cfg = TrainConfig(**yaml.safe_load(open(run / "config.yaml")))
train, held = task_lists(cfg.games, run / "games")
torch.manual_seed(0)
pol = InProcessPolicy(cfg.model, threads=1)
if version:
    pol.publish(version, load_file(run / "heldout-weights" / f"v{version:08d}.safetensors"))
env = make_env(cfg.games.env)
verbs = collections.Counter()
for task in held[:ntasks]:
    obs = env.reset(task); goal, hist = obs.text, []
    acts = []
    for step in range(cfg.rollout.max_steps):
        adm = list(obs.admissible_actions)
        msgs = build_messages(goal, hist, obs.text, adm, history_len=cfg.rollout.history_len)
        rep = pol.sample(msgs, SamplingParams(n=1, temperature=temp, max_tokens=64, choices=adm))[0]
        a = parse_action(rep.text, adm, bare_ok=True).action
        res = env.step(a); hist.append((a, res.observation.text)); obs = res.observation
        acts.append(a); verbs[a.split()[0]] += 1
        if res.done: break
    print(Path(task).name, "WIN" if res.done and res.success else "fail", " | ".join(acts))
print(verbs.most_common())
