"""Input formats: one module per format behind the ``Format`` interface and its registry,
and the watcher of a folder still being written."""
