"""A small RepVGG-style CNN in training form: the input of the ``merge-repvgg`` rewrite."""

from __future__ import annotations

SUMMARY = "RepVGG-style CNN (training form): 3x3+BN, 1x1+BN and identity-BN branches, 10 classes"
INPUTS = (("image", (1, 3, 32, 32), "float32"),)


def repvgg_block():
    """The ``RepVGGBlock`` module class, relu(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)]) in
    RepVGG's training form (convs without bias); a function so torch loads only when used."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        )

    class RepVGGBlock(nn.Module):
        """relu(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)]), as in RepVGG's training form."""

        def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
            super().__init__()
            self.dense = conv_bn(cin, cout, 3, stride, groups)
            self.one = conv_bn(cin, cout, 1, stride, groups)
            # The identity branch exists only where the shapes allow it.
            self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.dense(x) + self.one(x)
            if self.identity is not None:
                y = y + self.identity(x)
            return self.act(y)

    return RepVGGBlock


def build(seed: int = 0):
    import torch
    from torch import nn

    from ._init_utils import randomize_norm_stats

    RepVGGBlock = repvgg_block()

    class RepVGGCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                RepVGGBlock(3, 16, stride=2),
                RepVGGBlock(16, 16),
                RepVGGBlock(16, 32, stride=2),
                RepVGGBlock(32, 32),
                RepVGGBlock(32, 64, stride=2),
                RepVGGBlock(64, 64, groups=4),
            )
            self.head = nn.Linear(64, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(image).mean(dim=(2, 3)))

    torch.manual_seed(seed)
    return randomize_norm_stats(RepVGGCNN(), seed)
