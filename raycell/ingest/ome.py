"""OME-TIFF and OME-Zarr (NGFF) fields: found, read plane by plane, and their physical pixel size.

* **OME-TIFF** (and any multi-page TIFF) is read through tifffile: the axes come from the file's
  OME metadata (`series.axes`), and only the first series' full-resolution level is read, one page
  (one 2-D plane) at a time, so a pyramid's reduced levels and other series are never decoded.
* **OME-Zarr** is read through `ome-zarr`'s reader (lazy dask arrays over `zarr`): an image is a
  folder holding NGFF ``multiscales`` metadata (``<name>.zarr``, or a field of an HCS plate,
  ``<plate>.zarr/<row>/<col>/<field>``); its full-resolution level is read one (Z, C) plane at a
  time. `find_zarr_images` lists such folders inside every ``*.zarr`` folder under the input, so the
  images' regex (or the ``ome-zarr`` preset) matches their paths like files.
* **Pixel size**: OME-TIFF ``PhysicalSizeX/Y`` (+ units) or the NGFF level-0 scale on y/x (+ axis
  units), recorded in the manifest (`ingest.pixel_size`); None when a file does not say.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _zarr_attrs(folder: Path) -> dict:
    """The attributes of a zarr group folder (v2 ``.zattrs`` or v3 ``zarr.json``), {} if none."""
    if (folder / ".zattrs").is_file():
        return json.loads((folder / ".zattrs").read_text())
    if (folder / "zarr.json").is_file():
        meta = json.loads((folder / "zarr.json").read_text())
        attrs = meta.get("attributes", {})
        return attrs.get("ome", attrs)  # NGFF 0.5 keeps its metadata under "ome"
    return {}


def is_ome_zarr_image(folder: Path) -> bool:
    """Whether `folder` is an NGFF image (it has ``multiscales`` metadata)."""
    return folder.is_dir() and "multiscales" in _zarr_attrs(folder)


def find_zarr_images(root: Path) -> list[Path]:
    """NGFF image folders inside the ``*.zarr`` folders under `root` (not looking into images)."""
    out = []
    for top, dirs, _ in os.walk(root):
        here = Path(top)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        inside = any(part.endswith(".zarr") for part in here.relative_to(root).parts)
        if inside and is_ome_zarr_image(here):
            out.append(here)
            dirs[:] = []  # its resolution levels and labels are not images of their own
    return sorted(out)


def _node(path: str):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    loc = parse_url(path, mode="r")
    if loc is None:
        raise ValueError("not an OME-Zarr folder")
    nodes = list(Reader(loc)())
    if not nodes or not nodes[0].data:
        raise ValueError("no image data in its multiscales metadata")
    return nodes[0]


def _planes(lazy, axes: str, dtype) -> np.ndarray:
    """Materialise an array plane by plane (each 2-D YX plane read on its own)."""
    out = np.empty(lazy.shape, dtype)
    lead = [i for i, a in enumerate(axes) if a not in "YX"]
    for idx in np.ndindex(*[lazy.shape[i] for i in lead]):
        key = [slice(None)] * len(axes)
        for i, v in zip(lead, idx):
            key[i] = v
        out[tuple(key)] = np.asarray(lazy[tuple(key)])
    return out


def read_zarr(path: str) -> tuple[np.ndarray, str]:
    """An OME-Zarr image's full-resolution level as (array, axes), read plane by plane."""
    node = _node(path)
    data = node.data[0]
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in node.metadata["axes"]).upper()
    return _planes(data, axes, data.dtype), axes


def read_tiff(path: str) -> tuple[np.ndarray, str]:
    """A TIFF's first series (full resolution) as (array, axes), one page at a time."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        pages = series.pages
        if len(pages) <= 1:
            return series.asarray(), series.axes
        # pages enumerate the leading axes in order; each page holds the trailing plane axes
        page_shape = pages[0].shape
        out = np.empty(series.shape, series.dtype)
        flat = out.reshape(-1, *page_shape)
        if len(pages) != flat.shape[0]:  # an unusual layout: let tifffile assemble it
            return series.asarray(), series.axes
        for i, page in enumerate(pages):
            flat[i] = page.asarray()
        return out, series.axes


def pixel_size(path: str) -> dict | None:
    """{'x', 'y', 'unit'} from an OME-TIFF's or OME-Zarr's metadata; None when it gives none."""
    p = Path(path)
    try:
        if p.is_dir():
            node = _node(path)
            meta_axes = node.metadata["axes"]
            axes = [a["name"] if isinstance(a, dict) else a for a in meta_axes]
            units = [a.get("unit", "") if isinstance(a, dict) else "" for a in meta_axes]
            tr = node.metadata.get("coordinateTransformations") or [[]]
            scale = next((t["scale"] for t in tr[0] if t.get("type") == "scale"), None)
            if scale is None or "x" not in axes or "y" not in axes:
                return None
            ix, iy = axes.index("x"), axes.index("y")
            return {
                "x": float(scale[ix]),
                "y": float(scale[iy]),
                "unit": units[ix] or "",
                "source": "ome-zarr",
            }
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                if not tf.is_ome:
                    return None
                ome = tifffile.xml2dict(tf.ome_metadata)["OME"]
                image = ome["Image"][0] if isinstance(ome["Image"], list) else ome["Image"]
                px = image["Pixels"]
                if "PhysicalSizeX" not in px:
                    return None
                return {
                    "x": float(px["PhysicalSizeX"]),
                    "y": float(px.get("PhysicalSizeY", px["PhysicalSizeX"])),
                    "unit": str(px.get("PhysicalSizeXUnit", "µm")),
                    "source": "ome-tiff",
                }
    except Exception:  # noqa: BLE001 - metadata is optional; a broken file is rejected when read
        return None
    return None
