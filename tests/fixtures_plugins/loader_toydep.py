"""A plugin whose own import fails: the driver must name the missing dependency, not the plugin."""

import toy_dependency_that_is_not_installed  # noqa: F401


def add_arguments(parser):
    pass
