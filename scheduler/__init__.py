"""Quarry's scheduled side: the watchdog that recovers stale runs, and its beat schedule."""
