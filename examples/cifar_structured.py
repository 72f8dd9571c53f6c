"""Train (or fine-tune) a CIFAR model toward structured convolutions with StructuredConvCallback;
at fit end the network is decomposed into sum-pooling + smaller convolutions.

    python examples/cifar_structured.py --dataset digits --epochs 8 --channel-ratio 0.5         # offline, CPU
    python examples/cifar_structured.py --dataset cifar10 --data-dir data --download --devices 4 --arch resnet56
"""

from __future__ import annotations

import argparse
import sys

import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("cifar10", "digits"), default="digits")
    parser.add_argument("--data-dir", default="data", help="where cifar-10-batches-py is (or goes, with --download)")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--arch", default="resnet20", help="resnet20..resnet110, vgg16, or a torchvision name")
    common.trainer_arguments(parser, epochs=8, batch_size=64, lr=0.05)
    common.structured_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return common.run("structured", args, common.make_cifar_datamodule(args), num_classes=10)


if __name__ == "__main__":
    main(sys.argv[1:])
