"""The `capsnet` command: data, train, export (need the training extra) and serve."""
