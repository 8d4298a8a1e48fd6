"""coordinator (later issues)."""
