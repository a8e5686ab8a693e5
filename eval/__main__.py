"""``python -m eval ...`` (also under ``torchrun --nproc_per_node N -m eval ...``): the same as ``casc eval``."""

import argparse
import sys

from .cli import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
add_arguments(parser)
sys.exit(main(parser.parse_args()))
