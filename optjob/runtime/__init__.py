"""Process-level settings for the processes that run jobs (the worker and the container entrypoint)."""
