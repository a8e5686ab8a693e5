"""Model adapters: Ultralytics YOLO (``yolo``) and torchvision Faster R-CNN (``rcnn``)."""
