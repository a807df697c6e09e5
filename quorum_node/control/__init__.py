"""Control plane: API keys, the usage ledger, metrics, the dashboard."""
