"""Benchmarks, above the library: compare/ runs 3SPO against GRPO and GiGPO (`spo3-bench`),
perf/ times the parts (score store, actor loop, policy engines, learner) and the GPU check."""
