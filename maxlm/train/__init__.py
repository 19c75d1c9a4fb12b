"""Training: optimizer and schedules, losses, the jitted step and the loop."""
