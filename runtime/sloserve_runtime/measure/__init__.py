"""Measuring: the bench client, run metrics, capacity search, profiling, planning overhead and plots."""
