"""Recovery: everything about trades the socket may have missed, in one package.

- `planner`: the pure planner (which trade-time windows to fetch, which sweeps must wait for them);
- `gapwatch`: the stream's events turned into the planner's events;
- `fetcher`: fetches the planner's windows from Kalshi REST and feeds them through the live path.
"""
