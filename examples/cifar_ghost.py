"""Train (or fine-tune) a CIFAR model while GhostConvCallback turns its convolutions into Ghost modules.

python examples/cifar_ghost.py --dataset digits --epochs 8 --start-epoch 3 --stages 2      # offline, CPU
python examples/cifar_ghost.py --dataset cifar10 --data-dir data --download --devices 4 --arch resnet56
"""

from __future__ import annotations

import argparse
import sys

import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return common.cifar_parser(__doc__, "ghost").parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return common.run("ghost", args, common.make_cifar_datamodule(args), num_classes=10)


if __name__ == "__main__":
    main(sys.argv[1:])
