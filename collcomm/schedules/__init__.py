"""schedules (later issues)."""
