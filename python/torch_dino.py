"""An independent PyTorch implementation of DINO's networks and loss, written from
../shared/dino-spec.md (sections 2 and 4) with the reference's layer structure (explicit
attention, exact GELU, weight-normalised last layer): what the fixture scripts in
tests/fixtures/ compute their expected values with, and what the speed harness
(bench/dino_step.py) times. Needs torch.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        hd = c // self.heads
        qkv = self.qkv(x).view(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd), dim=-1)
        mixed = torch.matmul(weights, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(mixed), weights


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        y, weights = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), weights


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class Vit(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio):
        super().__init__()
        self.patch = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # Non-trivial norm parameters so a mix-up between weight and bias shows.
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.add_(0.1 * torch.randn_like(m.weight))
                    m.bias.add_(0.1 * torch.randn_like(m.bias))

    def position_embedding(self, h, w):
        n = self.pos_embed.shape[1] - 1
        gh, gw = h // self.patch, w // self.patch
        if gh * gw == n and h == w:
            return self.pos_embed
        side = int(math.sqrt(n))
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # The +0.1 keeps floor(side * scale) from rounding down; the scale itself, not the
        # output size, sets where the bicubic kernel samples.
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side),
                             mode="bicubic", align_corners=False)
        assert grid.shape[-2:] == (gh, gw)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def tokens(self, x):
        b, _, h, w = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        return x + self.position_embedding(h, w)

    def run(self, x, last_n=2):
        x = self.tokens(x)
        layers, weights = [], None
        for i, blk in enumerate(self.blocks):
            x, weights = blk(x)
            if len(self.blocks) - i <= last_n:
                layers.append(self.norm(x))
        return self.norm(x)[:, 0], layers, weights

    def forward(self, x):
        return self.run(x)[0]


class Head(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, use_bn=False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # Weight-normalised last layer written out by hand: weight = g * v / ||v|| per row.
        self.last_layer = nn.Module()
        self.last_layer.weight_v = nn.Parameter(torch.randn(out_dim, bottleneck_dim) * 0.25)
        self.last_layer.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=False)

    def forward(self, x):
        x = self.mlp(x)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        v = self.last_layer.weight_v
        weight = self.last_layer.weight_g * v / v.norm(dim=1, keepdim=True)
        return x @ weight.t()


def dino_loss(student_out, teacher_out, center, ncrops, teacher_temp, student_temp=0.1,
              center_momentum=0.9):
    s = (student_out / student_temp).chunk(ncrops)
    t = torch.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, terms = 0.0, 0
    for a, q in enumerate(t):
        for b, logits in enumerate(s):
            if a == b:
                continue
            total = total + torch.sum(-q * F.log_softmax(logits, dim=-1), dim=-1).mean()
            terms += 1
    loss = total / terms
    logq = F.log_softmax((teacher_out - center) / teacher_temp, dim=-1).chunk(2)
    entropy = torch.stack([torch.sum(-q * lq, dim=-1).mean() for q, lq in zip(t, logq)]).mean()
    new_center = center * center_momentum + teacher_out.detach().mean(0, keepdim=True) * (1 - center_momentum)
    return loss, new_center, entropy.detach(), (loss - entropy).detach()
