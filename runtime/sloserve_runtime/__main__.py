"""`python -m sloserve_runtime` is the `sloserve` command."""

from sloserve_runtime.cli import main

main()
