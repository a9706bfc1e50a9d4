"""The holdall command-line interface (see main.py)."""
