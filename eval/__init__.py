"""Evaluation of spiking detectors: mAP against time steps on COCO, VOC and the bundled set."""
