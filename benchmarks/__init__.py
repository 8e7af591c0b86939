"""Benchmarks: scripts run as `python benchmarks/NAME.py`; report.py holds their shared ending."""
