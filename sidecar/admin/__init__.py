"""The admin port: what the sidecar shows of itself, apart from the model traffic.

metrics (the Prometheus exposition) and status (the /status document, secrets redacted)
render a :class:`~sidecar.control.view.ControlView` and the data path's counters, purely;
server serves them, with /healthz, /readyz and /signals, on asyncio streams.
"""
