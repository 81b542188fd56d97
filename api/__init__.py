"""HTTP: one aiohttp module per facet, the log's own endpoints, and the app that joins them."""
