"""Process wiring shared by every part: Redis names, the CLI, launchers, metrics."""
