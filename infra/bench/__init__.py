"""Benchmarks, measured side by side in one run and reported as figures and ratios.

Never timed tests: these print what this machine does today. Every figure in one
report comes from the same servers within minutes of each other, so the ratios
mean more than the absolute numbers on a shared, noisy machine.

One module per measured path (`limits` of the machine, `relay`, `saga`, `api`, `dlq`
replay, `simulate`, the DBOS `peer_dbos`), their shared helpers in `common`.
Importing this package imports nothing.
"""
