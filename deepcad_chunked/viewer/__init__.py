"""The napari plugin: a reader for our stores and ``run``/``follow`` folders, and the Denoise,
Follow and Compare widgets (the ``[napari]`` extra; registered through ``napari.yaml``)."""
