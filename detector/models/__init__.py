"""Model adapters: ``detector.models.yolo`` (Ultralytics YOLO), ``detector.models.rcnn`` (torchvision).

Import the adapter you need; this package imports nothing heavy by itself.
"""
