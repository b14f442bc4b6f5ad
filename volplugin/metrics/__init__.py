"""Prometheus metrics of the plugin (`volplugin serve --metrics-address`)."""
