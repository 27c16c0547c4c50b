"""Learner: advantage estimation (3SPO step groups, GRPO, GiGPO) and the clipped policy loss."""
