"""Runnable examples and benchmark scripts.

A regular package: avalanche-lib installs a top-level ``examples`` package that would shadow a namespace one.
"""
