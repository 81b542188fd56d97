"""Per facet: the reactors that act on the log and record what happened as new events."""
