"""Benchmark commands (not tests): run one at a time, alone on the machine."""
