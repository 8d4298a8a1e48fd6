"""transport (later issues)."""
