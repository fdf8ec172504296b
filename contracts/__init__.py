"""Contracts: the engine's and the trace's invariants (contracts/*.yaml) and their runner."""
