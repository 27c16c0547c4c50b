"""Environment actors: adapters to real text environments and the 3SPO branching rollout."""
