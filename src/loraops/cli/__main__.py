"""`python -m loraops.cli`: the same commands as the `loraops` script."""

from loraops.cli import main

main()
