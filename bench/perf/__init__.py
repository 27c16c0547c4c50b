"""Performance benchmarks of the parts (score store, actor loop, policy engines, learner)."""
