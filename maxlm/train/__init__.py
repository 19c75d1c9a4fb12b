"""Training: batch types, objectives and their losses, optimizer, state, the jitted step, the run builder and the loop."""
