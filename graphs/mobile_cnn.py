"""A small MobileNet-style image classifier: the demo's default model."""

from __future__ import annotations

SUMMARY = "MobileNet-style CNN: conv-BN-ReLU stem, 4 depthwise-separable blocks, 10 classes"
INPUTS = (("image", (1, 3, 64, 64), "float32"),)


def build(seed: int = 0):
    import torch
    from torch import nn

    from ._init_utils import randomize_norm_stats

    def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        )

    def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin), conv_bn(cin, cout, 1))

    class MobileCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                conv_bn(3, 16, 3, 2),
                separable(16, 32, 1),
                separable(32, 64, 2),
                separable(64, 64, 1),
                separable(64, 128, 2),
            )
            self.head = nn.Linear(128, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(image).mean(dim=(2, 3)))

    torch.manual_seed(seed)
    return randomize_norm_stats(MobileCNN(), seed)
