"""Per facet: the events it records, its read model, and its pure decision functions."""
