"""Speed of the mini-PointNet patch encoder: pcd's channels-last matrix products against Point-MAE's layout, the
same weights run as kernel-1 Conv1d over (B*G, C, M), measured in one run (forward + backward).

Cases: pre-training frames (batch 32, 64 patches of 32 points), detection's tiny preset (batch 2, 128 x 8) and
detection at paper size (batch 2, 2,048 x 32).

    .venv/bin/python benchmarks/bench_patch_encoder.py [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grouping import best_time, timing_setup  # noqa: E402  (the micro-benchmarks' timing)

from pcd.trainer.backbone import PatchEncoder  # noqa: E402

CASES = [("pretrain frames", 32, 64, 32), ("detection tiny", 2, 128, 8), ("detection paper", 2, 2048, 32)]


def conv_layout(encoder: PatchEncoder, patches: Tensor) -> Tensor:
    """Point-MAE's Encoder.forward: the same modules' weights as Conv1d over (B*G, C, M)."""
    def run(block: nn.Sequential, x: Tensor) -> Tensor:
        conv0, norm, relu, conv1 = block
        x = F.conv1d(x, conv0.weight, conv0.bias)
        return F.conv1d(relu(norm(x)), conv1.weight, conv1.bias)

    batch, groups, size, _ = patches.shape
    x = run(encoder.first_conv, patches.reshape(batch * groups, size, 3).transpose(1, 2))
    x = run(encoder.second_conv, torch.cat([x.amax(dim=2, keepdim=True).expand(-1, -1, size), x], dim=1))
    return x.amax(dim=2).reshape(batch, groups, -1)


def main() -> None:
    args, device, sync = timing_setup(__doc__.splitlines()[0], repeats=5)
    encoder = PatchEncoder(384).to(device)
    print(f"torch {torch.__version__}, device {device}, {args.threads} intra-op thread(s), best of {args.repeats}, "
          "forward + backward, encoder_dims 384")
    for name, batch, groups, size in CASES:
        patches = torch.randn(batch, groups, size, 3, generator=torch.Generator().manual_seed(0)).to(device)
        difference = (encoder(patches) - conv_layout(encoder, patches)).abs().max().item()
        ours = best_time(lambda: encoder(patches).sum().backward(), args.repeats, sync)
        conv = best_time(lambda: conv_layout(encoder, patches).sum().backward(), args.repeats, sync)
        print(f"{name:16s} B={batch} G={groups} M={size}:  pcd {ours * 1e3:8.1f} ms   Conv1d layout "
              f"{conv * 1e3:8.1f} ms   ratio {ours / conv:5.2f}   max |difference| {difference:.1e}")


if __name__ == "__main__":
    main()
