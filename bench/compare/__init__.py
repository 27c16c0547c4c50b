"""3SPO vs GRPO vs GiGPO at equal env steps over paired seeds: planning, runs, statistics, reports."""
