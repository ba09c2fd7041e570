"""The REST control API (app.py, its paths in groups: instance_routes.py, daemon_routes.py,
report_routes.py, machine_routes.py, stream_routes.py, sharing answers.py and access.py; it acts only
through the Manager and reads the instance table, the GPU sampler, the peers and the event bus the wiring
hands it), and what stands in front of it: the Host and
cross-site checks (origin.py), the HTTP limits (limits.py), the token (auth.py), secrets kept from callers
without it (redact.py), requests whose client left (disconnect.py); the dashboard's files and streams
(ui.py) and the Prometheus metrics (metrics.py)."""
