"""Dataset readers (COCO, VOC, YOLO) on hand-written fixtures, their errors, and the bundled generator."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.data import (
    BUNDLED_CLASSES, DatasetError, DatasetWarning, DetectionDataset, ensure_bundled, generate_bundled, open_dataset,
    read_coco, read_voc, read_yolo,
)

SIZES = {"a.jpg": (40, 60), "b.png": (30, 50)}  # file -> (h, w)


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in SIZES.items():
        Image.new("RGB", (w, h), (200, 10, 10)).save(folder / name)


# ---- COCO --------------------------------------------------------------------------------

def coco_json(**overrides) -> dict:
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 60, "height": 40},
                   {"id": 9, "file_name": "b.png", "width": 50, "height": 30}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 60.5, 40], "area": 2400, "iscrowd": 1},
            {"id": 3, "image_id": 9, "category_id": 18, "bbox": [1.5, 2.5, 3, 4], "area": 12, "iscrowd": 0},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
    }
    data.update(overrides)
    return data


def make_coco(root: Path, data=None, layout="val2017") -> Path:
    images = root / layout
    write_images(images)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data or coco_json()))
    return path


def test_coco_reader_converts_boxes_and_sparse_ids(tmp_path):
    ann = make_coco(tmp_path)
    ds = read_coco(tmp_path / "val2017", ann)
    assert isinstance(ds, DetectionDataset) and len(ds) == 2
    assert ds.classes == ["car", "dog"] and ds.category_ids == [3, 18]
    assert ds.annotation_file == str(ann.resolve())
    img, t = ds[0]
    assert img.dtype == np.uint8 and img.shape == (40, 60, 3)
    assert np.abs(img[0, 0].astype(int) - (200, 10, 10)).max() < 5  # RGB order
    assert t["image_id"] == 7 and t["file"] == str((tmp_path / "val2017" / "a.jpg").resolve())
    assert t["boxes"].dtype == np.float32 and t["labels"].dtype == np.int64 and t["difficult"].dtype == np.bool_
    np.testing.assert_allclose(t["boxes"], [[10, 5, 30, 15], [0, 0, 60, 40]])  # xywh -> xyxy, 0.5 px clipped
    assert t["labels"].tolist() == [1, 0] and t["difficult"].tolist() == [False, True]  # crowd -> difficult
    assert ds.image_size(1) == (30, 50)
    np.testing.assert_allclose(ds.target(1)["boxes"], [[1.5, 2.5, 4.5, 6.5]])


@pytest.mark.parametrize("layout", ["val2017", "images/val", "."])
def test_open_dataset_coco_dir_layouts(tmp_path, layout):
    make_coco(tmp_path, layout=layout)
    ds = open_dataset(f"coco:{tmp_path}", split="val")
    assert len(ds) == 2 and Path(ds.image_path(0)).is_file() and ds.name.startswith("coco:")
    assert ds[1][0].shape == (30, 50, 3)


def test_coco_empty_images_are_kept(tmp_path):
    data = coco_json(annotations=[])
    ds = read_coco(tmp_path / "val2017", make_coco(tmp_path, data))
    t = ds.target(0)
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["difficult"].shape == (0,)


@pytest.mark.parametrize("data, message", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "JSON object"),
    (coco_json(categories=None), "not a COCO detection json"),
    (coco_json(annotations=[{"id": 1, "image_id": 7, "category_id": 99, "bbox": [1, 1, 2, 2]}]),
     "unknown category_id 99"),
    (coco_json(annotations=[{"id": 1, "image_id": 8, "category_id": 3, "bbox": [1, 1, 2, 2]}]), "unknown image ids"),
    (coco_json(annotations=[{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 2]}]), "malformed annotation"),
    (coco_json(annotations=[{"id": 1, "image_id": 7, "category_id": 3, "bbox": [50, 1, 15, 5]}]), "outside"),
])
def test_coco_errors_name_the_file(tmp_path, data, message):
    ann = make_coco(tmp_path, data)
    with pytest.raises(DatasetError, match=message) as err:
        read_coco(tmp_path / "val2017", ann)
    assert str(ann) in str(err.value)


def test_zero_size_boxes_are_dropped_with_a_warning(tmp_path):
    annotations = [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 0, 5]},
                   {"id": 2, "image_id": 7, "category_id": 18, "bbox": [2, 2, 10, 8]}]
    ann = make_coco(tmp_path, coco_json(annotations=annotations))
    with pytest.warns(DatasetWarning, match="dropped 1 box"):
        ds = read_coco(tmp_path / "val2017", ann)
    target = ds.target(0)
    assert target["boxes"].tolist() == [[2, 2, 12, 10]]
    assert [ds.category_ids[label] for label in target["labels"]] == [18]


def test_coco_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_coco(tmp_path, tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(f"coco:{tmp_path / 'missing'}")
    (tmp_path / "annotations").mkdir()
    with pytest.raises(DatasetError, match="instances_val"):
        open_dataset(f"coco:{tmp_path}")
    ann = make_coco(tmp_path)
    (tmp_path / "val2017" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match="a.jpg"):
        open_dataset(f"coco:{tmp_path}")
    ds = read_coco(tmp_path / "val2017", ann)
    with pytest.raises(DatasetError, match="a.jpg.*not found"):
        ds[0]


def test_image_size_mismatch_is_reported(tmp_path):
    data = coco_json()
    data["images"][0]["width"] = 61
    ds = read_coco(tmp_path / "val2017", make_coco(tmp_path, data))
    with pytest.raises(DatasetError, match="annotations say"):
        ds[0]


# ---- VOC ---------------------------------------------------------------------------------

VOC_XML = """<annotation>
  <folder>VOC2007</folder><filename>{file}</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJECT = """<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>
  <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def make_voc(root: Path, objects_a=None, xml_a=None) -> Path:
    voc = root / "VOC2007"
    write_images(voc / "JPEGImages")
    (voc / "JPEGImages" / "b.png").rename(voc / "JPEGImages" / "b.jpg")
    (voc / "Annotations").mkdir()
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "val.txt").write_text("a\nb\n")
    if objects_a is None:
        objects_a = [dict(name="dog", difficult=0, x1=1, y1=1, x2=60, y2=40),
                     dict(name="person", difficult=1, x1=11, y1=6, x2=20, y2=15)]
    objects = "".join(VOC_OBJECT.format(**o) for o in objects_a)
    (voc / "Annotations" / "a.xml").write_text(xml_a or VOC_XML.format(file="a.jpg", w=60, h=40, objects=objects))
    (voc / "Annotations" / "b.xml").write_text(VOC_XML.format(file="b.jpg", w=50, h=30, objects=""))
    return voc


def test_voc_reader(tmp_path):
    voc = make_voc(tmp_path)
    ds = open_dataset(f"voc:{voc}", split="val")
    assert len(ds.classes) == 20 and ds.classes[11] == "dog" and ds.name == "voc:VOC2007/val"
    img, t = ds[0]
    assert img.shape == (40, 60, 3)
    np.testing.assert_allclose(t["boxes"], [[0, 0, 60, 40], [10, 5, 20, 15]])  # 1-based -> (x1-1, y1-1, x2, y2)
    assert t["labels"].tolist() == [11, 14] and t["difficult"].tolist() == [False, True]
    assert ds.target(1)["boxes"].shape == (0, 4) and ds.image_size(1) == (30, 50)
    custom = read_voc(voc, "val", classes=["person", "dog"])
    assert custom.target(0)["labels"].tolist() == [1, 0]


@pytest.mark.parametrize("objects, xml, message", [
    (None, "<annotation><size>", "invalid XML"),
    ([dict(name="unicorn", difficult=0, x1=1, y1=1, x2=5, y2=5)], None, "unknown class name 'unicorn'"),
    ([dict(name="dog", difficult=0, x1=1, y1=1, x2=80, y2=5)], None, "outside"),
    ([dict(name="dog", difficult=0, x1="a", y1=1, x2=8, y2=5)], None, "non-numeric"),
])
def test_voc_errors_name_the_file(tmp_path, objects, xml, message):
    voc = make_voc(tmp_path, objects, xml)
    with pytest.raises(DatasetError, match=message) as err:
        read_voc(voc, "val")
    assert str(voc / "Annotations" / "a.xml") in str(err.value)


def test_voc_missing_split_and_dir(tmp_path):
    voc = make_voc(tmp_path)
    with pytest.raises(DatasetError, match="test.txt"):
        read_voc(voc, "test")
    with pytest.raises(DatasetError, match="not found"):
        read_voc(tmp_path / "nope")
    (voc / "Annotations" / "b.xml").unlink()
    with pytest.raises(DatasetError, match="b.xml"):
        read_voc(voc, "val")


# ---- YOLO --------------------------------------------------------------------------------

def make_yolo(root: Path, label_a="0 0.25 0.25 0.5 0.5\n2 0.5 0.5 1.0 1.0\n", names="[cat, dog, bird]") -> Path:
    write_images(root / "images" / "val")
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "a.txt").write_text(label_a)  # b.png has no label file: no objects
    yaml_path = root / "data.yaml"
    yaml_path.write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {names}\n")
    return yaml_path


def test_yolo_reader(tmp_path):
    yaml_path = make_yolo(tmp_path)
    for ds in (read_yolo(yaml_path, "val"), open_dataset(str(yaml_path)), open_dataset(f"yolo:{yaml_path}")):
        assert ds.classes == ["cat", "dog", "bird"] and len(ds) == 2
        img, t = ds[0]
        assert img.shape == (40, 60, 3)
        np.testing.assert_allclose(t["boxes"], [[0, 0, 30, 20], [0, 0, 60, 40]])
        assert t["labels"].tolist() == [0, 2] and not t["difficult"].any()
        assert ds.target(1)["boxes"].shape == (0, 4) and ds.image_size(1) == (30, 50)


def test_yolo_names_dict(tmp_path):
    ds = read_yolo(make_yolo(tmp_path, names="{0: cat, 1: dog, 2: bird}"), "val")
    assert ds.classes == ["cat", "dog", "bird"]


@pytest.mark.parametrize("label, names, message", [
    ("3 0.5 0.5 0.2 0.2\n", "[cat, dog, bird]", "class 3 out of range"),
    ("0 0.5 0.5 0.2\n", "[cat, dog, bird]", "expected 'cls cx cy w h'"),
    ("0 0.5 x 0.2 0.2\n", "[cat, dog, bird]", "non-numeric"),
    ("0 0.9 0.5 0.5 0.2\n", "[cat, dog, bird]", "outside"),
    ("0 0.5 0.5 0.2 0.2\n", "{1: cat}", "keys 0..0"),
    ("0 0.5 0.5 0.2 0.2\n", "[]", "names"),
])
def test_yolo_errors_name_the_file(tmp_path, label, names, message):
    yaml_path = make_yolo(tmp_path, label, names)
    with pytest.raises(DatasetError, match=message) as err:
        read_yolo(yaml_path, "val")
    assert "a.txt line 1" in str(err.value) or str(yaml_path) in str(err.value)


def test_yolo_missing_and_bad_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_yolo(tmp_path / "data.yaml")
    yaml_path = make_yolo(tmp_path)
    with pytest.raises(DatasetError, match="images/train"):
        read_yolo(yaml_path, "train")
    with pytest.raises(DatasetError, match="no 'test' entry"):
        read_yolo(yaml_path, "test")
    yaml_path.write_text("names: [a\n")
    with pytest.raises(DatasetError, match="invalid YAML"):
        read_yolo(yaml_path)


def test_unknown_spec():
    with pytest.raises(DatasetError, match="unknown dataset spec 'imagenet:x'"):
        open_dataset("imagenet:x")


# ---- the bundled benchmark -------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    return generate_bundled(tmp_path_factory.mktemp("bundled"), train=8, val=4, seed=0, workers=2)


def test_bundled_is_deterministic(bundled, tmp_path):
    again = generate_bundled(tmp_path / "again", train=8, val=4, seed=0, workers=1)
    for rel in ["images/train/000000.jpg", "images/val/000003.jpg", "labels/train/000005.txt",
                "annotations/instances_val.json", "VERSION"]:
        assert (bundled / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = generate_bundled(tmp_path / "other", train=1, val=0, seed=1, workers=1)
    assert (other / "images/train/000000.jpg").read_bytes() != (bundled / "images/train/000000.jpg").read_bytes()


def test_bundled_formats_agree(bundled):
    from pycocotools.coco import COCO

    for split, count in (("train", 8), ("val", 4)):
        coco = read_coco(bundled / "images" / split, bundled / "annotations" / f"instances_{split}.json")
        yolo = read_yolo(bundled / "data.yaml", split)
        assert len(coco) == len(yolo) == count and coco.classes == yolo.classes == list(BUNDLED_CLASSES)
        assert coco.category_ids == list(range(1, len(BUNDLED_CLASSES) + 1))
        for i in range(count):
            c, y = coco.target(i), yolo.target(i)
            assert c["file"] == y["file"]
            np.testing.assert_allclose(c["boxes"], y["boxes"], atol=1e-3)
            assert c["labels"].tolist() == y["labels"].tolist()
        api = COCO(str(bundled / "annotations" / f"instances_{split}.json"))
        assert len(api.getImgIds()) == count and len(api.getCatIds()) == len(BUNDLED_CLASSES)


def test_bundled_content(bundled):
    ds = read_yolo(bundled / "data.yaml", "train")
    labels = []
    for i in range(len(ds)):
        img, t = ds[i]
        assert img.shape == (256, 256, 3)
        boxes = t["boxes"]
        assert len(boxes) >= 1
        assert (boxes >= 0).all() and (boxes <= 256).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        labels += t["labels"].tolist()
    val = read_yolo(bundled / "data.yaml", "val")
    labels += [lab for i in range(len(val)) for lab in val.target(i)["labels"].tolist()]
    assert set(labels) == set(range(len(BUNDLED_CLASSES)))


def test_ensure_bundled_caches_and_regenerates(tmp_path, monkeypatch):
    monkeypatch.setenv("CASC_DATA", str(tmp_path))
    root = ensure_bundled(train=2, val=1, workers=1)
    assert root == tmp_path / "bundled-v1" and (root / "VERSION").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["bundled-v1"]  # no temp folders left
    stamp = (root / "images/train/000000.jpg").stat().st_mtime_ns
    assert ensure_bundled(train=2, val=1) == root
    assert (root / "images/train/000000.jpg").stat().st_mtime_ns == stamp  # cached
    ensure_bundled(train=3, val=1, workers=1)  # stale parameters -> regenerated
    assert (root / "images/train/000002.jpg").is_file() and '"train": 3' in (root / "VERSION").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundled-v1"]
    assert read_yolo(root / "data.yaml", "val").target(0)["file"].startswith(str(root.resolve()))
    moved = root.rename(tmp_path / "moved")
    assert ensure_bundled(moved, train=3, val=1) == moved
    assert read_yolo(moved / "data.yaml", "val").target(0)["file"].startswith(str(moved.resolve()))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    with pytest.raises(DatasetError, match="not overwriting"):
        ensure_bundled(tmp_path / "foreign")


def test_open_dataset_bundled(tmp_path, monkeypatch):
    monkeypatch.setenv("CASC_DATA", str(tmp_path))
    monkeypatch.setattr("detector.data.ensure_bundled",
                        lambda: ensure_bundled(train=2, val=2, workers=1))
    ds = open_dataset("bundled", split="val")
    assert len(ds) == 2 and ds.name == "bundled/val" and ds.classes == list(BUNDLED_CLASSES)
    assert ds.annotation_file.endswith("instances_val.json")
