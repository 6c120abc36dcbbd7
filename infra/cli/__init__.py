"""The `compensa` command line: a tree, not a web.

`main.py` builds the root Typer and adds one group per module; every group module
imports only `common.py` (the leaf: consoles, errors, the `command` wrapper, openers,
parsers, safe rendering) and the product packages, never another group or `main`.
Importing this package imports nothing.
"""
