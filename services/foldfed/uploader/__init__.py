"""Participant side: send a delta to the hub, resumably, sending only what it lacks."""
