"""Simulation: the seeded driver, the fault injector, the real-stack run, the read-back, the SQLite facade."""
