"""Recovery: everything about trades the socket may have missed, in one package.

- `recovery`: `Recovery`, the one object the daemon talks to (a loss's whole life: the stream's events, the
  windows, the fetch, the feed, the holds, the checkpoint, the stall watch), and `NoRecovery` for a replay;
- `planner`: the pure planner (which trade-time windows to fetch, which sweeps must wait for them);
- `gapwatch`: the stream's events turned into the planner's events;
- `fetcher`: fetches the planner's windows from Kalshi REST and feeds them through the live path.
"""
