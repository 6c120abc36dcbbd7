"""The dead-letter archive and the operator's tools over it: list, show, replay, purge."""
