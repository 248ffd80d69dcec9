"""Checks: what to request (targets), how (http), when (rounds), and what came of it."""
