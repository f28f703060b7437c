"""The store: the OME-Zarr layout and its attributes, a store's life (lock, pins, markers,
completion), locations (paths and URLs), foreign stores, statistics and integrity."""
