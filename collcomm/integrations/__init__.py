"""integrations (later issues)."""
