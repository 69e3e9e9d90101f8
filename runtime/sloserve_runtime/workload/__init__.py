"""Workloads: programs of stage calls, and the scenario files that generate their traces."""
