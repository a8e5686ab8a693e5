"""Options that both families' QAT recipes share, under the same names (``casc train yolo|rcnn``)."""

from __future__ import annotations

import argparse

from ..calibrate import THETA_METHODS
from .yolo_qat import THETA_MODES


def add_qat_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--theta``, ``--calibrate-images``, ``--first-levels``, ``--theta-init``, ``--max-minutes``."""
    parser.add_argument("--theta", choices=THETA_MODES, default="learn",
                        help="thresholds during fine-tuning: learnt in their own group (no weight decay) or frozen "
                             "at their calibrated values")
    parser.add_argument("--theta-init", choices=THETA_METHODS, default="mse",
                        help="calibrated threshold of a float start: quantization-MSE optimum or a percentile")
    parser.add_argument("--calibrate-images", type=int, default=256,
                        help="training images for the post-training calibration of a float start (no labels used)")
    parser.add_argument("--first-levels", type=int, default=None,
                        help="levels of the first activation (e.g. 8; the network then runs that many wake steps)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this many minutes")
