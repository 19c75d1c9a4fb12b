"""`python -m maxlm ...` == the `maxlm` console script (for environments where the script is not on PATH)."""

from maxlm.cli import main

raise SystemExit(main())  # the exit code is the command's (launchers and tests read it)
