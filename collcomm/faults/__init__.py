"""faults (later issues)."""
