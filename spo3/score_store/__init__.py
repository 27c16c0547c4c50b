"""State scores for 3SPO: the pure math, the Redis-backed store and its HTTP service."""
