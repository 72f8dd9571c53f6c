"""How tests/data/records_v1.pt was made: run with lightning-cheapconv 0.1 (commit 58e33ae) checked out at
``/tmp/headwt`` (``git worktree add /tmp/headwt 58e33ae``). Its records are dicts of record version 1.

Not collected by pytest; kept so that the file's origin can be checked and the file made again.
"""

import sys

sys.path[:0] = ["/tmp/headwt", "/tmp/headwt/tests"]

import torch  # noqa: E402
from nets import randomize_bn, tiny_backbone  # noqa: E402

import lightning_cheapconv as lc  # noqa: E402
from lightning_cheapconv.nn import StructuredLinear  # noqa: E402

assert lc.__file__.startswith("/tmp/headwt"), lc.__file__
torch.manual_seed(0)
everywhere = {"skip_first": False, "skip_last": False}
ghost = randomize_bn(tiny_backbone(seed=1))
lc.convert_to_ghost(ghost, include=["3", "6"], init="inherit", **everywhere)
structured = randomize_bn(tiny_backbone(seed=2))
lc.decompose_structured(structured, include=["3", "6", "9"], **everywhere)
structured[14] = StructuredLinear.from_dense(structured[14], hidden_features=12)
x = torch.randn(2, 3, 16, 16)
folded = randomize_bn(tiny_backbone(seed=3))
lc.decompose_structured(folded, include=["3"], **everywhere)
print([f.applied for f in lc.fold_batchnorm(folded.eval(), x)])
out = {}
for name, model in [("ghost", ghost), ("structured", structured), ("folded", folded)]:
    model.eval()
    out[name] = {"state_dict": model.state_dict(), "input": x, "output": model(x).detach()}
torch.save(out, "tests/data/records_v1.pt")
