"""eventhub: one immutable, append-only event log and the machinery around it.

This package knows nothing about facets: it holds events, stores, the hash chain,
subscriptions, the projections framework, settings and the core command line.
"""
