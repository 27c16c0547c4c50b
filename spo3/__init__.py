"""3SPO as a distributed actor-learner system, one package a layer (each imports only those below):

app/                 entry points: the `spo3` CLI, the one-machine launcher, wiring, SFT, reports
actors/ | learner/   environment rollouts (3SPO branching, GRPO/GiGPO episodes) | the update
policy/ | score_store/   what actors sample from and how weights reach it | state scores
transport/           Redis names and connections, the work queue, the groups stream, metrics
"""
