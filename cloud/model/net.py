"""The temporal sensor-graph network: window [T, N] -> fault probability, residuals, contributions.

The graph is built inside the network, so the exported ONNX (and the TensorRT engine built
from it) computes exactly what was trained:

1. normalise with the constants baked in as buffers; missing readings become 0;
2. split the window into S segments of L steps; per segment, a Pearson-correlation adjacency
   between sensors, thresholded at |r| > tau (a sequence of graphs over time), mixed with an
   adaptive adjacency from learned node embeddings;
3. a graph convolution per segment, a GRU across segments (unrolled: S is small, and plain
   MatMul/Sigmoid/Tanh export to every runtime and quantize cleanly);
4. attention over sensors pools the node states into a window state.

Outputs: `fault_prob` [B] (supervised head, trained where labels exist), `residual` [B, N]
(per sensor, the mean squared error of a forecast of the last segment from the earlier ones:
the unsupervised signal, learned from normal data alone) and `contribution` [B, N] (mean of
the attention weight and the residual share: which sensors show it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

INPUT_NAMES = ("window", "mask")
OUTPUT_NAMES = ("fault_prob", "residual", "contribution")
CLAMP = 20.0


@dataclass(frozen=True)
class NetConfig:
    """Shape and size of the network."""

    sensors: int
    window: int = 60
    segments: int = 4
    hidden: int = 32
    embedding: int = 8
    corr_threshold: float = 0.3

    def __post_init__(self) -> None:
        if self.window % self.segments:
            raise ValueError(f"window {self.window} is not a multiple of {self.segments} segments")

    @property
    def segment_length(self) -> int:
        return self.window // self.segments

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class SensorGraphNet(nn.Module):
    """Correlation + adaptive graph convolution, GRU over segments, attention over sensors."""

    center: Tensor
    scale: Tensor
    eye: Tensor

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, h, seg = cfg.sensors, cfg.hidden, cfg.segment_length
        self.register_buffer("center", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("eye", torch.eye(n), persistent=False)
        self.node_src = nn.Parameter(torch.randn(n, cfg.embedding) * 0.3)
        self.node_dst = nn.Parameter(torch.randn(n, cfg.embedding) * 0.3)
        self.sensor_embed = nn.Parameter(torch.zeros(n, h))
        self.mix_logit = nn.Parameter(torch.zeros(()))
        self.encode = nn.Linear(seg + 1, h)
        self.graph = nn.Linear(h, h)
        self.gru_x = nn.Linear(h, 3 * h)
        self.gru_h = nn.Linear(h, 3 * h)
        self.attend = nn.Linear(h, 1)
        self.decode = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, seg))
        self.classify = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, 1))

    def set_normalisation(self, center: Tensor, scale: Tensor) -> None:
        """Bake the training data's per-sensor centre and scale into the network."""
        self.center.copy_(center)
        self.scale.copy_(scale)

    def normalise(self, window: Tensor, mask: Tensor) -> Tensor:
        z = (window - self.center) / self.scale
        return torch.clamp(z, -CLAMP, CLAMP) * mask

    def adjacency(self, seg: Tensor) -> Tensor:
        """Per-segment adjacency [B, S, N, N] from thresholded correlation and embeddings."""
        cfg = self.cfg
        centred = seg - seg.mean(dim=2, keepdim=True)  # [B, S, L, N]
        cov = torch.matmul(centred.transpose(2, 3), centred) / cfg.segment_length
        std = torch.sqrt((centred * centred).mean(dim=2) + 1e-4)  # [B, S, N]
        corr = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
        strength = torch.abs(corr)
        graph = strength * (strength > cfg.corr_threshold).to(strength.dtype)
        graph = graph + self.eye
        graph = graph / graph.sum(dim=-1, keepdim=True)
        adaptive = torch.softmax(torch.relu(self.node_src @ self.node_dst.T), dim=-1)
        mix = torch.sigmoid(self.mix_logit)
        return mix * graph + (1 - mix) * adaptive

    def forward(self, window: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        b = window.shape[0]
        s, seg_len, n, h = cfg.segments, cfg.segment_length, cfg.sensors, cfg.hidden
        z = self.normalise(window, mask)
        seg = z.reshape(b, s, seg_len, n)
        seg_mask = mask.reshape(b, s, seg_len, n)
        adj = self.adjacency(seg)
        # Node features per segment: its L values and the share of valid readings.
        feats = torch.cat([seg.transpose(2, 3), seg_mask.mean(dim=2).unsqueeze(-1)], dim=-1)
        x = torch.relu(self.encode(feats) + self.sensor_embed)  # [B, S, N, H]
        x = x + torch.relu(self.graph(torch.matmul(adj, x)))
        state = torch.zeros(b, n, h, dtype=z.dtype, device=z.device)
        for step in range(s - 1):
            state = self._gru_step(x[:, step], state)
        # Forecast the last segment from the earlier ones (residuals learned from normal data).
        forecast = self.decode(
            torch.cat([state, state.mean(dim=1, keepdim=True).expand(b, n, h)], -1)
        )
        target = seg[:, -1].transpose(1, 2)
        last_mask = seg_mask[:, -1].transpose(1, 2)
        valid = last_mask.sum(dim=-1).clamp(min=1.0)
        residual = (((forecast - target) ** 2) * last_mask).sum(dim=-1) / valid  # [B, N]
        state = self._gru_step(x[:, s - 1], state)
        weights = torch.softmax(self.attend(torch.tanh(state)).squeeze(-1), dim=-1)  # [B, N]
        pooled = (weights.unsqueeze(-1) * state).sum(dim=1)  # [B, H]
        fault_prob = torch.sigmoid(self.classify(torch.cat([pooled, state.mean(dim=1)], -1)))
        share = residual / (residual.sum(dim=-1, keepdim=True) + 1e-6)
        contribution = 0.5 * (weights + share)
        return fault_prob.squeeze(-1), residual, contribution

    def _gru_step(self, x: Tensor, state: Tensor) -> Tensor:
        xr, xz, xn = self.gru_x(x).chunk(3, dim=-1)
        hr, hz, hn = self.gru_h(state).chunk(3, dim=-1)
        reset = torch.sigmoid(xr + hr)
        update = torch.sigmoid(xz + hz)
        candidate = torch.tanh(xn + reset * hn)
        return (1 - update) * candidate + update * state
