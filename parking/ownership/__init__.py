"""Plate ownership disputes: who holds a vehicle's (plate, colour) binding when two drivers
claim it, decided by the vehicle registry's record or by an operator admin."""
