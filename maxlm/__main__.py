"""`python -m maxlm ...` == the `maxlm` console script (for environments where the script is not on PATH)."""

from maxlm.cli import main

main()
