"""ImageNet (ImageFolder layout: DATA_DIR/train/<class>/*.JPEG, DATA_DIR/val/<class>/*.JPEG) with either callback.

    python examples/imagenet.py --data-dir /data/imagenet --arch resnet50 --method ghost --devices 8 \
        --precision bf16-mixed --channels-last --batch-size 128 --lr 0.2 --epochs 90 --num-workers 8
"""

from __future__ import annotations

import argparse
import sys

import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder with train/ and val/ in ImageFolder layout")
    parser.add_argument("--arch", default="resnet50", help="a torchvision model name or ghostnet_100")
    parser.add_argument("--method", choices=("ghost", "structured"), default="ghost")
    common.trainer_arguments(parser, epochs=90, batch_size=128, lr=0.1)
    common.ghost_arguments(parser)
    common.structured_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    datamodule = common.make_imagenet_datamodule(args)
    datamodule.setup("fit")
    return common.run(args.method, args, datamodule, num_classes=datamodule.num_classes)


if __name__ == "__main__":
    main(sys.argv[1:])
