"""Policy serving: the interface actors sample from, its engines, and weight publishing."""
