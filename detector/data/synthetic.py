"""The bundled benchmark: seeded synthetic scenes of coloured shapes on cluttered backgrounds.

Eight classes that differ in shape and (overlapping) colour ranges, 1-8 objects of
10-150 px per image, drawn back to front so later objects occlude earlier ones. Boxes are
tight to the visible pixels; objects less than 30 % visible (occluded or cut by the
border) are not annotated. Written in three formats at once: YOLO txt + data.yaml,
COCO json (category ids 1..K), and VERSION (the generator parameters).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm
import yaml

from .dataset import DatasetError

CLASSES = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "ellipse")
# Class hue centres (degrees); jitter of +-HUE_JITTER makes neighbouring classes share hues,
# and similar shapes (circle/ring/hexagon/ellipse) sit far apart on the wheel.
CLASS_HUES = (0, 45, 90, 135, 180, 225, 270, 315)
HUE_JITTER = 35
RANDOM_HUE_P = 0.1
MIN_SIZE, MAX_SIZE = 10, 150
MAX_OBJECTS = 8
MIN_VISIBLE = 0.3
GENERATOR = "bundled-v1"
JPEG_QUALITY = 90
SPLITS = ("train", "val")
SHIFT = 4  # cv2 fixed-point bits for sub-pixel drawing
ONE = 1 << SHIFT


def bundled_root() -> Path:
    """`$CASC_DATA/bundled-v1`, else `~/.cache/casc/bundled-v1`."""
    base = os.environ.get("CASC_DATA")
    return Path(base) / GENERATOR if base else Path.home() / ".cache" / "casc" / GENERATOR


def ensure_bundled(root: str | os.PathLike | None = None, **params) -> Path:
    """Generate the bundled set at `root` unless it is there with the same parameters.

    Generation goes to a temporary sibling folder that is renamed into place at the end,
    so an interrupted run never leaves a half dataset. Takes generate_bundled's keywords.
    """
    root = Path(root) if root is not None else bundled_root()
    version = _version_text(**{k: v for k, v in params.items() if k != "workers"})
    version_file = root / "VERSION"
    if version_file.is_file() and version_file.read_text() == version:
        if yaml.safe_load((root / "data.yaml").read_text()).get("path") != str(root.resolve()):
            _write_data_yaml(root, root)  # the folder was moved
        return root
    if root.exists() and not version_file.is_file():
        raise DatasetError(f"{root}: exists but holds no generated dataset (no VERSION); not overwriting it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        generate_bundled(tmp, **params)
        _write_data_yaml(tmp, root)
        if root.exists():  # stale: move it aside, then drop it
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}-stale-", dir=root.parent))
            root.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(root)
    except OSError:
        if not (version_file.is_file() and version_file.read_text() == version):  # not a concurrent winner
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def generate_bundled(root: str | os.PathLike, train: int = 4000, val: int = 500, seed: int = 0,
                     size: int = 256, workers: int | None = None) -> Path:
    """Write the dataset under `root`; image i of a split depends only on (seed, split, i)."""
    root = Path(root)
    workers = workers or min(16, os.cpu_count() or 1)
    counts = {"train": train, "val": val}
    for split in SPLITS:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    jobs = [(str(root), split, i, seed, size) for split in SPLITS for i in range(counts[split])]
    progress = tqdm(total=len(jobs), desc=f"bundled dataset -> {root}", unit="img", disable=len(jobs) < 100)
    with progress:
        if workers > 1 and len(jobs) > 1:
            with Pool(workers) as pool:
                results = []
                for result in pool.imap(_render_and_write, jobs, chunksize=max(1, len(jobs) // (workers * 8))):
                    results.append(result)
                    progress.update()
        else:
            results = []
            for job in jobs:
                results.append(_render_and_write(job))
                progress.update()
    for split in SPLITS:
        split_results = [r for job, r in zip(jobs, results) if job[1] == split]
        _write_coco(root / "annotations" / f"instances_{split}.json", split_results, size)
    _write_data_yaml(root, root)
    (root / "VERSION").write_text(_version_text(train=train, val=val, seed=seed, size=size))
    return root


def render_scene(rng: np.random.Generator, size: int = 256):
    """One scene: (RGB uint8 image, int boxes [N,4] xyxy, labels [N], visible pixel counts [N])."""
    img = _background(rng, size)
    owner = np.full((size, size), -1, np.int16)
    objects = []
    for j in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        label = int(rng.integers(len(CLASSES)))
        extent = math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE)))
        centre = rng.uniform(0, size, 2)
        objects.append((label, *_draw_object(img, owner, j, rng, label, centre, extent)))
    for _ in range(int(rng.integers(0, 3))):  # thin occluding lines over the objects
        owner[_draw_line(img, rng, size, thickness=int(rng.integers(1, 3))) > 127] = -1
    _finish(img, rng)

    boxes, labels, areas = [], [], []
    for j, (label, full_area, (x0, y0, x1, y1)) in enumerate(objects):
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == j)
        if full_area == 0 or len(xs) < MIN_VISIBLE * full_area:
            continue
        box = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
        if box[2] - box[0] < 3 or box[3] - box[1] < 3:
            continue
        boxes.append(box)
        labels.append(label)
        areas.append(len(xs))
    return (np.clip(img, 0, 255).astype(np.uint8), np.array(boxes, np.int64).reshape(-1, 4),
            np.array(labels, np.int64), np.array(areas, np.int64))


def _render_and_write(job):
    root, split, index, seed, size = job
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    img, boxes, labels, areas = render_scene(rng, size)
    stem = f"{index:06d}"
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok, "JPEG encoding failed"
    Path(root, "images", split, f"{stem}.jpg").write_bytes(jpeg.tobytes())
    lines = [f"{c} {(x1 + x2) / 2 / size:.8f} {(y1 + y2) / 2 / size:.8f} {(x2 - x1) / size:.8f} {(y2 - y1) / size:.8f}"
             for c, (x1, y1, x2, y2) in zip(labels, boxes)]
    Path(root, "labels", split, f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
    return f"{stem}.jpg", boxes.tolist(), labels.tolist(), areas.tolist()


def _write_coco(path: Path, results, size: int) -> None:
    images, annotations = [], []
    for image_id, (file_name, boxes, labels, areas) in enumerate(results, 1):
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for (x1, y1, x2, y2), label, area in zip(boxes, labels, areas):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    data = {"info": {"description": f"casc {GENERATOR} synthetic shapes"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data, separators=(",", ":")))


def _write_data_yaml(root: Path, final_root: Path) -> None:
    data = {"path": str(final_root.resolve()), "train": "images/train", "val": "images/val",
            "names": list(CLASSES)}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _version_text(train: int = 4000, val: int = 500, seed: int = 0, size: int = 256) -> str:
    return json.dumps({"generator": GENERATOR, "train": train, "val": val, "seed": seed, "size": size}) + "\n"


# ---- drawing ---------------------------------------------------------------------------

def _random_colour(rng: np.random.Generator, hue: float | None = None) -> np.ndarray:
    """RGB float colour; a random hue unless one is given (degrees)."""
    h = rng.uniform(0, 360) if hue is None else hue
    s, v = rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)
    return np.array(colorsys.hsv_to_rgb((h % 360) / 360, s, v), np.float32) * 255


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + low-frequency colour noise + optional stripes + distractor clutter (float32 RGB)."""
    c1, c2 = _random_colour(rng), _random_colour(rng)
    theta = rng.uniform(0, 2 * math.pi)
    grid = np.arange(size, dtype=np.float32) / size
    t = (np.cos(theta) * grid[None, :] + np.sin(theta) * grid[:, None])
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c1 + (c2 - c1) * t[..., None]
    cells = int(rng.integers(3, 12))
    noise = rng.normal(0, rng.uniform(10, 35), (cells, cells, 3)).astype(np.float32)
    img += cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.3:
        period = rng.uniform(4, 24)
        phi = rng.uniform(0, 2 * math.pi)
        stripes = np.sin(2 * math.pi * (np.cos(phi) * grid[None, :] + np.sin(phi) * grid[:, None]) * size / period)
        img += (stripes * rng.uniform(8, 25))[..., None].astype(np.float32)
    for _ in range(int(rng.integers(3, 13))):
        kind = rng.integers(4)
        if kind == 0:
            _draw_line(img, rng, size, thickness=int(rng.integers(1, 5)))
        elif kind == 1:
            _draw_blob(img, rng, size)
        elif kind == 2:
            _draw_arc(img, rng, size)
        else:
            _draw_scribble(img, rng, size)
    return img


def _pts(points: np.ndarray) -> np.ndarray:
    return np.round(points * ONE).astype(np.int32).reshape(-1, 1, 2)


def _draw_line(img, rng, size, thickness) -> np.ndarray:
    """A straight line across the image; returns its mask."""
    p1, p2 = rng.uniform(-20, size + 20, (2, 2))
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.line(mask, tuple(_pts(p1).ravel()), tuple(_pts(p2).ravel()), 255, thickness, cv2.LINE_AA, SHIFT)
    _blend(img, mask, _random_colour(rng))
    return mask


def _draw_blob(img, rng, size):
    """An irregular star-convex blob (not one of the classes)."""
    n = 24
    angles = np.linspace(0, 2 * math.pi, n, endpoint=False)
    wobble = np.convolve(np.tile(rng.normal(0, 1, n), 3), np.ones(3) / 3, "same")[n:2 * n]
    radius = rng.uniform(6, 45) * (1 + 0.9 * wobble)
    centre = rng.uniform(0, size, 2)
    points = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * np.maximum(radius, 2)[:, None]
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(mask, [_pts(points)], 255, cv2.LINE_AA, SHIFT)
    _blend(img, mask, _random_colour(rng))


def _draw_arc(img, rng, size):
    mask = np.zeros(img.shape[:2], np.uint8)
    centre = tuple(int(v) for v in rng.integers(0, size, 2))
    axes = tuple(int(v) for v in rng.integers(8, 60, 2))
    start = float(rng.uniform(0, 360))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), start, start + float(rng.uniform(60, 200)),
                255, int(rng.integers(1, 4)), cv2.LINE_AA)
    _blend(img, mask, _random_colour(rng))


def _draw_scribble(img, rng, size):
    steps = rng.normal(0, 12, (int(rng.integers(3, 8)), 2)).cumsum(0)
    points = rng.uniform(0, size, 2) + steps
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.polylines(mask, [_pts(points)], False, 255, int(rng.integers(1, 4)), cv2.LINE_AA, SHIFT)
    _blend(img, mask, _random_colour(rng))


def _blend(img, mask, colour):
    x, y, w, h = cv2.boundingRect(mask)
    if w and h:
        alpha = (mask[y:y + h, x:x + w].astype(np.float32) / 255)[..., None]
        window = img[y:y + h, x:x + w]
        window += (colour - window) * alpha


def _shape_polygons(rng, label: int, extent: float):
    """(filled polygons, hole polygons) of a class shape centred at 0, about `extent` across."""
    r = extent / 2
    rot = rng.uniform(0, 2 * math.pi)
    name = CLASSES[label]

    def regular(n, radius, phase=0.0):
        a = np.linspace(0, 2 * math.pi, n, endpoint=False) + rot + phase
        return np.stack([np.cos(a), np.sin(a)], 1) * radius

    holes = []
    if name == "circle":
        polys = [regular(48, r)]
    elif name == "square":
        polys = [regular(4, r)]
    elif name == "triangle":
        polys = [regular(3, r)]
    elif name == "hexagon":
        polys = [regular(6, r)]
    elif name == "star":
        outer, inner = regular(5, r), regular(5, r * rng.uniform(0.38, 0.5), math.pi / 5)
        polys = [np.stack([outer, inner], 1).reshape(-1, 2)]
    elif name == "ring":
        polys, holes = [regular(48, r)], [regular(48, r * rng.uniform(0.45, 0.7))]
    elif name == "cross":
        arm = r * rng.uniform(0.28, 0.4)
        xy = np.array([(arm, r), (arm, arm), (r, arm), (r, -arm), (arm, -arm), (arm, -r),
                       (-arm, -r), (-arm, -arm), (-r, -arm), (-r, arm), (-arm, arm), (-arm, r)], np.float64)
        c, s = math.cos(rot), math.sin(rot)
        polys = [xy @ np.array([[c, s], [-s, c]])]
    else:  # ellipse
        a = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        xy = np.stack([np.cos(a) * r, np.sin(a) * r * rng.uniform(0.35, 0.6)], 1)
        c, s = math.cos(rot), math.sin(rot)
        polys = [xy @ np.array([[c, s], [-s, c]])]
    return polys, holes


def _draw_object(img, owner, index, rng, label, centre, extent):
    """Draw one class object with shading and mark its pixels in `owner`.

    Returns its full (unclipped) area and its window (x0, y0, x1, y1) in the image."""
    polys, holes = _shape_polygons(rng, label, extent)
    size = img.shape[0]
    lo = np.floor(np.concatenate(polys).min(0) + centre).astype(int) - 2
    hi = np.ceil(np.concatenate(polys).max(0) + centre).astype(int) + 3
    local = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), np.uint8)
    offset = centre - lo
    cv2.fillPoly(local, [_pts(p + offset) for p in polys], 255, cv2.LINE_AA, SHIFT)
    if holes:
        cv2.fillPoly(local, [_pts(p + offset) for p in holes], 0, cv2.LINE_AA, SHIFT)
    full_area = int((local > 127).sum())
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], size), min(hi[1], size)
    if x1 <= x0 or y1 <= y0:
        return full_area, (0, 0, 0, 0)
    mask = local[y0 - lo[1]:y1 - lo[1], x0 - lo[0]:x1 - lo[0]]
    window = img[y0:y1, x0:x1]

    if rng.random() < RANDOM_HUE_P:
        hue = rng.uniform(0, 360)
    else:
        hue = CLASS_HUES[label] + rng.uniform(-HUE_JITTER, HUE_JITTER)
    colour = _random_colour(rng, hue)
    for _ in range(4):  # avoid colours that vanish into the background under the object
        inside = window[mask > 127]
        if len(inside) == 0 or np.linalg.norm(inside.mean(0) - colour) > 60:
            break
        colour = _random_colour(rng, hue)
    gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    phi = rng.uniform(0, 2 * math.pi)
    along = ((gx - centre[0]) * math.cos(phi) + (gy - centre[1]) * math.sin(phi)) / max(extent, 1)
    shade = 1 + rng.uniform(0, 0.35) * along
    alpha = (mask.astype(np.float32) / 255)[..., None]
    window[:] = window * (1 - alpha) + (colour * shade[..., None]) * alpha
    owner[y0:y1, x0:x1][mask > 127] = index
    return full_area, (x0, y0, x1, y1)


def _finish(img, rng):
    """Sensor effects: sometimes blur, always gaussian noise (in place)."""
    if rng.random() < 0.3:
        img[:] = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.3))
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 9))
