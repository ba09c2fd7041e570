"""Process supervision: one server process (process.py: spawn, group stop, parent death), one instance's
lifecycle (instance.py: its requests; server_runs.py: its supervision task; record.py: its state and events;
download_task.py, prompt_caches.py, plan_check.py: its download, prompt caches and plan check;
instance_status.py: what the API shows of it; parts.py: the daemon's parts it is given), all of them
(manager.py; placing.py: where each starts; reload_changes.py: what a reload changes; rolling.py: rolling
restarts) and the table the daemon's parts share them by (table.py), and beside them: the restart policy
(policy.py), the moves between states (transitions.py), a server's last words (server_errors.py) and the
thermal guard's verdict (thermal.py), all four pure; the servers an earlier daemon left running, stopped
(leftovers.py; the files are launcher/statedir's), failed writes to the state directory counted (writes.py),
ports (ports.py), planning in bounded threads (planning.py), failover's verdicts carried out (degrade.py),
what `GET /rpc` reports of this host's rpc-servers (rpc_report.py), the GPU memory a start waits for
(vram.py), and what this host's GPUs hold and lend to peers (lending.py)."""
