"""Paper fidelity of counts: parameters and MACs from ``count_complexity`` next to the papers' numbers.

Run ``python -m benchmarks.counts``. Ghost converts every conv but the first (``convert_to_ghost``
defaults); structured uses ``decompose_structured`` with n = k - 1 and the given channel ratio on
every conv but the first (1x1 convs only when channel_ratio < 1). MACs are FlopCounterMode FLOPs /
2 for one image (bias and BatchNorm not counted); parameters include BatchNorm. Sum-pool
additions of structured layers are not MACs and are listed apart.
"""

from __future__ import annotations

import argparse

import torch
import torchvision

from lightning_cheapconv import convert_to_ghost, count_complexity, decompose_structured
from lightning_cheapconv.models import resnet56, vgg16

from .common import Section, command, percent

# (model, method, setting) -> (params, MACs) from ../shared/REFERENCES.md; None where the paper gives none.
PAPER = {
    ("ResNet-56", "original", ""): (0.85e6, 125e6),
    ("ResNet-56", "ghost", "s=2 d=3"): (0.43e6, 63e6),
    ("ResNet-56", "structured", "c=C n=2"): (None, None),
    ("ResNet-56", "structured", "c=C/2 n=2"): (None, None),
    ("VGG-16", "original", ""): (15.0e6, 313e6),
    ("VGG-16", "ghost", "s=2 d=3"): (7.7e6, 158e6),
    ("VGG-16", "ghost", "s=3 d=3"): (5.2e6, 107e6),
    ("VGG-16", "ghost", "s=4 d=3"): (4.0e6, 80e6),
    ("VGG-16", "ghost", "s=5 d=3"): (3.3e6, 65e6),
    ("VGG-16", "ghost", "s=2 d=1"): (7.6e6, 157e6),
    ("VGG-16", "ghost", "s=2 d=5"): (7.7e6, 160e6),
    ("VGG-16", "ghost", "s=2 d=7"): (7.7e6, 163e6),
    ("ResNet-50", "original", ""): (25.6e6, 4.1e9),
    ("ResNet-50", "ghost", "s=2 d=3"): (13.0e6, 2.2e9),
    ("ResNet-50", "ghost", "s=4 d=3"): (6.5e6, 1.2e9),
    ("ResNet-50", "structured", "c=C n=2"): (None, None),
    ("ResNet-50", "structured", "c=C/2 n=2"): (13.5e6, None),
    ("MobileNetV2", "original", ""): (3.5e6, 300e6),
    ("MobileNetV2", "ghost", "s=2 d=3"): (None, None),
    ("MobileNetV2", "structured", "c=C/2 n=2"): (2.6e6, None),
}
# An independent analytic recount (REFERENCES.md) where the paper's own figure is rounded or disputed.
RECOUNT = {
    ("ResNet-56", "ghost", "s=2 d=3"): (0.438e6, 65.3e6),
    ("VGG-16", "ghost", "s=2 d=3"): (7.65e6, 158.7e6),
    ("ResNet-56", "original", ""): (853_018, 125.5e6),
}

NOTES = """\
Notes on differences above 3%:
- Ghost-ResNet-50 parameters (+7% at s=2, +25% at s=4): REFERENCES.md records that the paper's
  Ghost-ResNet-50 parameter counts cannot be reproduced from the released code (an open question
  upstream). We keep the stem and the 2.05M-parameter classifier dense, as for the CIFAR models;
  the MACs, which the classifier hardly affects, agree within 2.2%.
- Structured rows: REFERENCES.md marks the paper's Struct-56/50/MV2 numbers as recalled, with
  per-layer hidden sizes we do not have. Our uniform settings (every conv but the first, n = k - 1,
  c = C or C/2) are a different configuration: ResNet-50 at c=C/2 is 10.7M against Struct-50-A's
  13.5M, MobileNetV2 at c=C/2 is 2.41M against Struct-MV2-A's 2.6M. ResNet-56 at c=C gives
  0.38M, near Struct-56-B's 0.37M; at c=C/2 0.19M (Struct-56-A: 0.48M).
"""


def _models():
    cifar = (1, 3, 32, 32)
    imagenet = (1, 3, 224, 224)
    return [
        ("ResNet-56", resnet56, cifar, [("ghost", 2, 3), ("structured", 1.0), ("structured", 0.5)]),
        (
            "VGG-16",
            vgg16,
            cifar,
            [("ghost", s, 3) for s in (2, 3, 4, 5)] + [("ghost", 2, d) for d in (1, 5, 7)] + [("structured", 1.0)],
        ),
        (
            "ResNet-50",
            torchvision.models.resnet50,
            imagenet,
            [("ghost", 2, 3), ("ghost", 4, 3), ("structured", 1.0), ("structured", 0.5)],
        ),
        ("MobileNetV2", torchvision.models.mobilenet_v2, imagenet, [("ghost", 2, 3), ("structured", 0.5)]),
    ]


def _setting(method: tuple) -> str:
    if method[0] == "ghost":
        return f"s={method[1]} d={method[2]}"
    return "c=C n=2" if method[1] == 1.0 else "c=C/2 n=2"


def _row(model: str, method: str, setting: str, params: int, macs: int, adds: int) -> str:
    ref_params, ref_macs = PAPER.get((model, method, setting), (None, None))
    recount = RECOUNT.get((model, method, setting))
    cells = [
        model,
        method,
        setting,
        f"{params / 1e6:.3f}M",
        f"{macs / 1e6:.1f}M",
        f"{adds / 1e6:.2f}M" if adds else "-",
    ]
    for ours, ref in ((params, ref_params), (macs, ref_macs)):
        cells.append(f"{ref / 1e6:.2f}M ({percent(ours, ref)})" if ref else "-")
    if recount:
        (rec_params, rec_macs) = recount
        cells.append(
            f"{rec_params / 1e6:.3f}M ({percent(params, rec_params)}) / "
            f"{rec_macs / 1e6:.1f}M ({percent(macs, rec_macs)})"
        )
    else:
        cells.append("-")
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> Section:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    torch.manual_seed(0)
    lines = [
        "| model | method | setting | params | MACs | pool adds | paper params | paper MACs | recount params/MACs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    missed: list[str] = []
    for name, build, shape, methods in _models():
        original = count_complexity(build().eval(), input_shape=shape)
        lines.append(_row(name, "original", "", original.params, original.macs, 0))
        for method in methods:
            model = build().eval()
            if method[0] == "ghost":
                convert_to_ghost(model, ratio=method[1], dw_size=method[2], init="random")
            else:
                decompose_structured(model, channel_ratio=method[1])
            counted = count_complexity(model, input_shape=shape)
            lines.append(_row(name, method[0], _setting(method), counted.params, counted.macs, counted.adds))
    body = (
        "Params include BatchNorm; MACs per image (FLOPs / 2, bias and BN not counted); "
        "% is ours against the reference.\n\n" + "\n".join(lines) + "\n\n" + NOTES
    )
    section = Section("counts", "1. Paper fidelity of counts", body, command(__spec__.name, argv), missed)
    section.save()
    return section


if __name__ == "__main__":
    main()
