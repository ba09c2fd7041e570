"""The state directory (`daemon.state_dir`) and its files, for the daemon, supervision and the CLI alike:
where each file is (layout.py: the one place the layout is spelled), the lock and owner record (owner.py:
which daemon owns the directory, read without locking), the log files (logs.py: the servers' output with
the launcher's markers, rotation, the last run's lines, following) and the children file (children.py:
the records of the servers a daemon runs, checked one by one as they are read back).

Stopping the leftover servers the children file names is supervision's (launcher/supervise/leftovers.py):
this package reads and writes files, it stops no process. Importing it costs nothing: each module is
imported by the commands that use it (logs.py needs asyncio)."""
