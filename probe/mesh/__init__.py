"""The mesh view: every probe's last round, assembled on demand, and verdicts from it."""
