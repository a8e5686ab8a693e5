"""Checkpoints carry a digest of their contents; a file modified after writing is refused at load."""

from __future__ import annotations

import pytest
import torch

from detector import checkpoint
from detector.checkpoint import CheckpointError, UnreadableCheckpoint


def _payload():
    return {"format": "casc-test", "meta": {"names": ["a", "b"], "imgsz": 64},
            "state_dict": {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "n": torch.tensor(3)}}


def test_saved_checkpoints_carry_a_digest_and_load_back_equal(tmp_path):
    path = checkpoint.save(_payload(), tmp_path / "a.pt")
    data = checkpoint.load(path)
    assert data[checkpoint.DIGEST_KEY] == checkpoint.content_digest(_payload())
    assert torch.equal(data["state_dict"]["w"], _payload()["state_dict"]["w"])
    assert not (tmp_path / "a.pt.tmp").exists()


def test_checkpoints_are_deflated_and_plain_archives_still_load(tmp_path):
    import zipfile
    payload = _payload()
    payload["state_dict"]["zeros"] = torch.zeros(4096, dtype=torch.float16)
    first = checkpoint.save(payload, tmp_path / "a.pt")
    with zipfile.ZipFile(first) as archive:
        assert {entry.compress_type for entry in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    plain = tmp_path / "plain.pt"
    torch.save(checkpoint.load(first), plain)  # torch.save's own stored archive
    assert first.stat().st_size < plain.stat().st_size
    assert torch.equal(checkpoint.load(plain)["state_dict"]["zeros"], payload["state_dict"]["zeros"])
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("edit", ["tensor", "metadata", "new key"])
def test_a_checkpoint_modified_after_writing_is_refused(tmp_path, edit):
    path = checkpoint.save(_payload(), tmp_path / "a.pt")
    data = torch.load(path, weights_only=True)
    if edit == "tensor":
        data["state_dict"]["w"][0, 0] += 1e-3
    elif edit == "metadata":
        data["meta"]["names"] = ["a", "z"]
    else:
        data["extra"] = 1
    torch.save(data, path)  # rewritten without recomputing the digest, as a tampering tool would
    with pytest.raises(CheckpointError, match="do not match the digest"):
        checkpoint.load(path)


def test_file_digest_mismatch_and_unreadable_files_are_clear_errors(tmp_path):
    path = checkpoint.save(_payload(), tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        checkpoint.load(path, sha256="0" * 64)
    assert checkpoint.load(path, sha256=checkpoint.file_sha256(path))["format"] == "casc-test"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UnreadableCheckpoint):
        checkpoint.load(junk)
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.pt")


def test_files_written_before_digests_load_unchanged(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(_payload(), path)
    assert checkpoint.load(path)["meta"]["imgsz"] == 64


def test_both_families_write_digested_checkpoints_and_refuse_tampered_copies(tmp_path):
    from detector.models import rcnn, yolo
    from detector.weights import resolve

    model, meta = yolo.load_checkpoint(resolve("yolov8n-bundled").path)
    path = yolo.export_checkpoint(model, tmp_path / "y.pt", names=meta["names"], imgsz=meta["imgsz"])
    det, _ = yolo.load_checkpoint(path)
    assert checkpoint.DIGEST_KEY in torch.load(path, weights_only=True)
    data = torch.load(path, weights_only=True)
    data["state_dict"]["model.0.conv.weight"].mul_(1.01)
    torch.save(data, path)
    with pytest.raises(CheckpointError):
        yolo.load_checkpoint(path)

    net, meta = rcnn.load_float_for_calibration(resolve("rcnn-r18-bundled-float").path)
    path = rcnn.save_qann(rcnn.to_qann_fasterrcnn(net, 4), tmp_path / "r.pt", meta)
    assert rcnn.SpikingFasterRCNN.from_checkpoint(path).levels == 4
    data = torch.load(path, weights_only=True)
    data["meta"]["classes"][0] = "tampered"
    torch.save(data, path)
    with pytest.raises(CheckpointError):
        rcnn.SpikingFasterRCNN.from_checkpoint(path)


def test_any_file_at_all_is_one_clear_error(tmp_path):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")  # torch.load raises IndexError on this one
    with pytest.raises(UnreadableCheckpoint) as refused:
        checkpoint.load(text)
    assert "\n" not in str(refused.value) and "not a readable checkpoint" in str(refused.value)
