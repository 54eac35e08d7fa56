"""A module without add_arguments: the driver must refuse it."""
