"""napari's reader contribution: our stores and ``run``/``follow`` folders, opened lazily."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from deepcad_chunked.viewer.layers import META, LayerData, read_layers, readable

#: What napari links between a denoised layer and its recording's.
LINKED = ("contrast_limits", "gamma", "colormap")


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """napari's reader hook: a reader for our stores and output folders, None for others."""
    return _read if readable(path) is not None else None


def _read(path: str | Sequence[str]) -> list[LayerData]:
    target = readable(path)
    assert target is not None
    layers = read_layers(target)
    _link_when_added()
    return layers


def _link_when_added() -> None:
    """Link the layers of a pair once napari has added them (its next turn of events)."""
    try:
        from qtpy.QtCore import QTimer
    except ImportError:  # napari without Qt: nothing to link in
        return
    import napari

    QTimer.singleShot(0, lambda: link_pairs(napari.current_viewer()))


def link_pairs(viewer: Any) -> int:
    """Link each denoised layer's contrast, gamma and colour map to its recording's layer in
    ``viewer`` (the layers our reader or widgets added). Returns how many layers were linked.
    """
    if viewer is None:
        return 0
    from napari.experimental import link_layers
    from napari.layers.utils._link_layers import get_linked_layers

    groups: dict[str, list[Any]] = {}
    for lay in viewer.layers:
        ours = lay.metadata.get(META) if hasattr(lay, "metadata") else None
        if ours and ours.get("pair"):
            groups.setdefault(ours["pair"], []).append(lay)
    linked = 0
    for layers in groups.values():
        if len(layers) < 2:
            continue
        first = layers[0]
        new = [lay for lay in layers[1:] if lay not in get_linked_layers(first)]
        if new:
            for lay in new:  # shown like the first before the link holds them together
                lay.contrast_limits = first.contrast_limits
            link_layers([first, *new], LINKED)
            linked += len(new) + 1
    return linked
