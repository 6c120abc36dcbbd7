"""`python -m infra.cli …`, the same as the `compensa` console script."""

from infra.cli.main import main

main()
