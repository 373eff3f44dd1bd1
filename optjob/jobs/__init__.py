"""Jobs that run: the five operations' semantics, a durable store, and a local executor.

``service`` (the rules, for every transport) · ``store`` (SQLite WAL, compare-and-set transitions)
· ``listing`` (List filters and NextToken) · ``executor`` (slots, worker processes, signals, time
limits, recovery) · ``daemon`` (one executor per data directory, started on demand) · ``worker``
(one job in its own process) · ``outcomes`` (how a job ends, shared by worker and executor) ·
``logs`` (each job's JSON-lines log). See docs/jobs.md.
"""
