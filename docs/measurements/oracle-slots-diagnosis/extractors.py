"""Policy encoders tried on oracle slots (exploratory; see README.md)."""
import math, torch
from torch import nn
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor


class RelationalSlotEncoder(nn.Module):
    def __init__(self, gestalt_dim, features_dim=128, hidden=64, heads=4, layers=1, queries=4):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(gestalt_dim + 5, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(hidden), attn=nn.MultiheadAttention(hidden, heads, batch_first=True),
                ln2=nn.LayerNorm(hidden), mlp=nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden)))))
        self.queries = nn.Parameter(torch.randn(1, queries, hidden) / math.sqrt(hidden))
        self.pool = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln = nn.LayerNorm(hidden)
        self.out = nn.Sequential(nn.Linear(queries * hidden, features_dim), nn.ReLU())
    def forward(self, gestalt, position, depth, presence):
        x = torch.cat([gestalt, position, depth], -1).float()
        b = x.shape[0]
        h = torch.cat([self.null.expand(b, -1, -1), self.embed(x)], 1)
        absent = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=x.device), presence <= 0.5], 1)
        for blk in self.blocks:
            y = blk["ln1"](h)
            h = h + blk["attn"](y, y, y, key_padding_mask=absent, need_weights=False)[0]
            h = h + blk["mlp"](blk["ln2"](h))
        h = self.ln(h)
        pooled = self.pool(self.queries.expand(b, -1, -1), h, h, key_padding_mask=absent, need_weights=False)[0]
        return self.out(pooled.reshape(b, -1))


class PairSlotEncoder(nn.Module):
    """Relational: tokens for every ordered slot pair (i, j) incl. i == j, with p_j - p_i."""
    def __init__(self, gestalt_dim, features_dim=128, hidden=64, heads=4, queries=4):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(gestalt_dim + 5, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.pair = nn.Sequential(nn.Linear(2 * hidden + 3, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))
        self.queries = nn.Parameter(torch.randn(1, queries, hidden) / math.sqrt(hidden))
        self.pool = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.out = nn.Sequential(nn.Linear(queries * hidden, features_dim), nn.ReLU())
    def tokens(self, gestalt, position, depth, presence):
        """Pair tokens [B, K*K, H] and the mask of pairs of present slots [B, K*K]."""
        x = torch.cat([gestalt, position, depth], -1).float()
        b, k, _ = x.shape
        e = self.embed(x)
        ei = e[:, :, None].expand(b, k, k, -1); ej = e[:, None, :].expand(b, k, k, -1)
        dp = position[:, None, :, :2] - position[:, :, None, :2]
        dd = depth[:, None, :, :] - depth[:, :, None, :]
        t = self.pair(torch.cat([ei, ej, dp, dd], -1)).reshape(b, k * k, -1)
        pres = presence > 0.5
        return t, (pres[:, :, None] & pres[:, None, :]).reshape(b, k * k)

    def forward(self, gestalt, position, depth, presence):
        t, ok = self.tokens(gestalt, position, depth, presence)
        b = t.shape[0]
        t = torch.cat([self.null.expand(b, -1, -1), t], 1)
        absent = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=t.device), ~ok], 1)
        pooled = self.pool(self.queries.expand(b, -1, -1), t, t, key_padding_mask=absent, need_weights=False)[0]
        return self.out(pooled.reshape(b, -1))


class PairMeanEncoder(PairSlotEncoder):
    """Pair tokens, masked mean + max pooling (no learned selection)."""
    def __init__(self, gestalt_dim, features_dim=128, hidden=64, **kw):
        super().__init__(gestalt_dim, features_dim, hidden)
        self.out = nn.Sequential(nn.Linear(2 * hidden, features_dim), nn.ReLU())
    def forward(self, gestalt, position, depth, presence):
        t, ok = self.tokens(gestalt, position, depth, presence)
        ok = ok[..., None].float()
        mean = (t * ok).sum(1) / ok.sum(1).clamp_min(1)
        mx = (t * ok).max(1).values
        return self.out(torch.cat([mean, mx], -1))



class AttentionPoolEncoder(nn.Module):
    """locis_rl.rl.slot_set.SlotSetEncoder before the pair encoder (commit 9f91963)."""
    """Shared per-slot MLP + attention pooling with a learned query, masked by presence.

    Args:
        gestalt_dim: ``G``.
        features_dim: output size.
        hidden: width of the per-slot MLP and of the attention.
        heads: attention heads (``hidden`` must be divisible by it).
        presence_threshold: a slot counts as present when ``presence > presence_threshold``.

    Shapes: ``gestalt [*, K, G]``, ``position [*, K, 4]``, ``depth [*, K, 1]``, ``presence [*, K]``
    -> ``[*, features_dim]``.

    Example:
        >>> enc = SlotSetEncoder(96, features_dim=64)
        >>> enc(torch.rand(5, 6, 96), torch.rand(5, 6, 4), torch.rand(5, 6, 1), torch.ones(5, 6)).shape
        torch.Size([5, 64])
    """

    def __init__(self, gestalt_dim: int, features_dim: int = 128, hidden: int = 128, heads: int = 4,
                 presence_threshold: float = 0.5):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads, actual value: {heads}")
        self.gestalt_dim, self.hidden, self.heads = gestalt_dim, hidden, heads
        self.presence_threshold = presence_threshold
        self.slot_mlp = nn.Sequential(
            nn.Linear(gestalt_dim + 5, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.query = nn.Parameter(torch.randn(heads, hidden // heads) / math.sqrt(hidden // heads))
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Sequential(nn.Linear(hidden + 1, features_dim), nn.ReLU())

    def forward(self, gestalt: torch.Tensor, position: torch.Tensor, depth: torch.Tensor,
                presence: torch.Tensor) -> torch.Tensor:
        x = torch.cat([gestalt, position, depth], -1).float()              # [*, K, G+5]
        h = self.slot_mlp(x)                                                  # [*, K, H]
        *batch, k, _ = h.shape
        d = self.hidden // self.heads
        keys = self.key(h).reshape(*batch, k, self.heads, d)
        values = self.value(h).reshape(*batch, k, self.heads, d)
        scores = (keys * self.query).sum(-1) / math.sqrt(d)                  # [*, K, heads]
        present = (presence.float() > self.presence_threshold)[..., None]     # [*, K, 1]
        # Absent slots get the lowest score; an all-absent row softmaxes uniformly and is then
        # zeroed by the mask (no -inf, hence no NaN).
        scores = scores.masked_fill(~present, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-2) * present                            # over slots
        pooled = (weights[..., None] * values).sum(-3).reshape(*batch, self.hidden)
        count = present.float().mean((-2, -1))[..., None]                     # [*, 1]
        return self.out(torch.cat([pooled, count], -1))




class EncoderExtractor(BaseFeaturesExtractor):
    """SB3 features extractor around any of the encoders above (``encoder_class``)."""
    def __init__(self, observation_space, features_dim=128, encoder_class=None, **kw):
        super().__init__(observation_space, features_dim)
        self.encoder = encoder_class(observation_space["gestalt"].shape[-1], features_dim, **kw)
    def forward(self, o):
        return self.encoder(o["gestalt"], o["position"], o["depth"], o["presence"])
