"""pick-best, fuse and report commands (registered by cli_eval)."""
