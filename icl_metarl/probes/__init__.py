"""Probes of an in-context policy: what it attends to while it adapts, and what it uses."""
