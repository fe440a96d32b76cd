"""The contender apps the load test runs (each is started as its own server process)."""
