"""`maxlm compile`: the real train step compiled for a TPU slice or GPU cluster the host does not have."""
