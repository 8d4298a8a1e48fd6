"""Faults: per-link telemetry (:mod:`.telemetry`), the link-fault detector (:mod:`.detector`) and
fault injection on the wire (:mod:`.inject`, ``COLLCOMM_FAULTS``)."""
