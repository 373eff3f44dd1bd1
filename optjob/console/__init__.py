"""The web console: what the store records about a caller's jobs, as pages a person can look at.

A transport like the API server: every action goes through ``JobService.handle`` with the signed-in
caller, so the console can show and do exactly what that caller's API calls could, nothing more.
"""
