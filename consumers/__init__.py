"""Participant services: orders, stock, payments (behind a gateway port), ledger (double entry)."""
