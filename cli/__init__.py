"""The ``deepcad-chunked`` command line, a thin layer over the library."""
