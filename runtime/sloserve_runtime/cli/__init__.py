"""The `sloserve` command line."""
