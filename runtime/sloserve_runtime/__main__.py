"""`python -m sloserve_runtime` is the `sloserve` command."""

from sloserve_runtime.cli.main import main

main()
