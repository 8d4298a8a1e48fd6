"""Link health, as pure decisions: the link-fault detector (:mod:`.detector`: verdicts from
telemetry observations), the monitor's decisions (:mod:`.decisions`: merge reports, blame,
reroute, partition), chunk sizing from measured rates (:mod:`.chunks`), and plans of faults
injected on the wire (:mod:`.inject`, ``COLLCOMM_FAULTS``). The control loop that runs them is
:mod:`collcomm.runtime.monitor`; the telemetry it reads is :mod:`collcomm.transport.telemetry`."""
