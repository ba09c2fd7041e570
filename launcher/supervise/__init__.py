"""Process supervision: one process (process.py), one instance's lifecycle (instance.py), all of them
(manager.py), and the restart policy (policy.py) as pure arithmetic."""
