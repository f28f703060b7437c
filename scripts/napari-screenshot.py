"""Draw the README's picture of the napari plugin: a ``run`` (or ``demo``) output folder
opened side by side, the Compare widget showing the traces of its brightest cell.

Usage: python scripts/napari-screenshot.py RUN_FOLDER [-o docs/images/napari.png]
(needs the ``[napari]`` extra and a display; ``xvfb-run`` gives one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/images/napari.png"))
    args = parser.parse_args()

    import napari

    from deepcad_chunked.viewer.compare_widget import CompareWidget

    viewer = napari.Viewer(show=False)
    viewer.window.resize(1400, 800)
    viewer.open(str(args.folder), plugin="deepcad-chunked")
    viewer.grid.enabled = True
    viewer.dims.set_current_step(0, 150)
    widget = CompareWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Compare", area="right")
    raw = viewer.layers["raw"]
    mean = np.asarray(raw.data[:200], dtype=np.float64).mean(axis=0)
    y, x = np.unravel_index(int(np.argmax(mean)), mean.shape)
    widget.radius.setValue(4)
    widget.show_disc(float(y), float(x))
    viewer.layers.selection.active = raw
    viewer.reset_view()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(path=str(args.output), canvas_only=False)
    print(args.output)


if __name__ == "__main__":
    main()
