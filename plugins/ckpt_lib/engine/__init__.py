"""Conversions: loaders and savers built from families, plans and writers; verification of streams."""
