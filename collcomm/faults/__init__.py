"""Faults: per-link telemetry (:mod:`.telemetry`) and the link-fault detector (:mod:`.detector`)."""
