"""Operator scripts; scripts/stack.py is both a command and a library (`from scripts.stack import start_stack`)."""
