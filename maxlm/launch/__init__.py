"""`maxlm launch`: start the multi-controller runtime's processes (today: several on this machine)."""
