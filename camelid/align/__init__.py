"""Learning from feedback (issue 14): reward models, preference optimization, RLHF."""
