"""The learning side: ingest turns, judge them, train the policy, publish weight deltas."""
