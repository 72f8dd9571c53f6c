"""LightningCLI entry point: the callbacks are plain, typed Lightning callbacks, so the CLI configures them.

    python examples/cli.py fit --model.backbone resnet20 --data lightning_cheapconv.DigitsDataModule \
        --trainer.max_epochs 4 --trainer.accelerator cpu \
        --trainer.callbacks+=lightning_cheapconv.GhostConvCallback --trainer.callbacks.ratio 2
"""

from pytorch_lightning import LightningDataModule
from pytorch_lightning.cli import LightningCLI

from lightning_cheapconv import ImageClassifier


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(ImageClassifier, LightningDataModule, subclass_mode_data=True, args=args)


if __name__ == "__main__":
    main()
