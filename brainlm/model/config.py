"""BrainLMConfig: the shape of a BrainLM masked autoencoder, and the size presets."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..errors import ConfigError

MASK_STRATEGIES = ("random", "parcel", "future", "time", "space")
ATTENTION_LAYOUTS = ("full", "factorised")

# What makes our models learn (benchmarks/learning_curve.py, README "A recipe that learns"):
# attention biases towards the same moment and between parcels, coordinates with Fourier
# features, and a last decoder block whose masked queries attend to the visible tokens only.
# The config defaults stay upstream's Family A (all off), so its weights still load.
# Not in the recipe: `linear_prior` (the decoder starts from the space-time rung fitted on the
# training split). It lifts the demo's validation R^2 from 0.45 to 0.61, level with the rung and
# not above it, and its encoder reads out worse: the connectivity readout of age on validation
# falls from 0.615 to 0.554 (benchmarks/README.md, "Levers"). Turn it on per run with
# `model: {linear_prior: true}`; it needs the atlas's coordinates (`parcel_coords`).
RECIPE = dict(coord_frequencies=6, time_attention_bias=True, space_attention_rank=16,
              decoder_cross_attention=True)

# encoder (hidden, layers, heads, mlp) / decoder (hidden, layers, heads, mlp)
PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, decoder_hidden_size=64, decoder_num_hidden_layers=1,
                 decoder_num_attention_heads=2, decoder_intermediate_size=128),
    # upstream Family A shape (released as old_13M)
    "13m": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=1024, decoder_hidden_size=512, decoder_num_hidden_layers=2,
                decoder_num_attention_heads=4, decoder_intermediate_size=1024),
    # the released ViTMAE sizes, as token models
    "111m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, decoder_hidden_size=512, decoder_num_hidden_layers=8,
                 decoder_num_attention_heads=16, decoder_intermediate_size=2048),
    "650m": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                 intermediate_size=5120, decoder_hidden_size=512, decoder_num_hidden_layers=8,
                 decoder_num_attention_heads=16, decoder_intermediate_size=2048),
}


class BrainLMConfig(PretrainedConfig):
    """Tokens are (parcel, time patch) pairs: a [P, T] window gives P * T / patch_size tokens.

    The parcel count is not part of the shape: parcels enter through their MNI coordinates
    (divided by `coord_scale` mm), so one model runs on any atlas.

    What makes it learn (all off by default, as upstream's Family A; the presets turn them on):
    coord_frequencies: sin/cos features of the coordinates at 2^0..2^(k-1) pi, so parcels get
        non-linear identities (0: Linear(xyz) only).
    time_attention_bias: a learned bias per head and time-patch distance (ALiBi-initialised).
    space_attention_rank: rank of a learned bias between parcels from their coordinate
        features (0: none).
    decoder_cross_attention: the last decoder block's masked queries attend to CLS and the
        visible tokens only (CrossMAE); there, a masked token's key holds no signal.
    linear_prior: the decoder starts from the space-time rung (`prior.LinearPrior`, fitted on
        the training split by the trainer, saved with the weights) and learns its residual;
        ties the model to its atlas's parcels (`parcel_coords`).

    Levers tried against the linear ceiling (benchmarks/README.md; off by default, not in the
    recipe):
    attention_layout: "full" (every token) or "factorised" (encoder blocks alternate attention
        within one time patch and within one parcel).
    norm_patch_loss: MAE's loss on each masked patch normalised by its own mean and std; `pred`
        is then the patch's shape, not its values (no reconstruction R^2).
    latent_loss_weight: weight of a second, JEPA-style objective: predict from the decoder the
        encoder's own embedding of each masked token with the whole window seen (stop-gradient,
        layer-normed; no EMA copy, the pixel loss keeps it from collapsing).
    """

    model_type = "brainlm"

    def __init__(self, window: int = 200, patch_size: int = 20, hidden_size: int = 512,
                 num_hidden_layers: int = 4, num_attention_heads: int = 4,
                 intermediate_size: int = 1024, decoder_hidden_size: int = 512,
                 decoder_num_hidden_layers: int = 2, decoder_num_attention_heads: int = 4,
                 decoder_intermediate_size: int = 1024, mask_ratio: float = 0.75,
                 mask_strategy: str = "random", future_patches: int = 1,
                 coord_scale: float = 100.0, coord_frequencies: int = 0,
                 decoder_cross_attention: bool = False, time_attention_bias: bool = False,
                 space_attention_rank: int = 0, linear_prior: bool = False,
                 attention_layout: str = "full", norm_patch_loss: bool = False,
                 latent_loss_weight: float = 0.0, layer_norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, attention_backend: str = "sdpa",
                 **kwargs):
        self.window = window
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_intermediate_size = decoder_intermediate_size
        self.mask_ratio = mask_ratio
        self.mask_strategy = mask_strategy
        self.future_patches = future_patches
        self.coord_scale = coord_scale
        self.coord_frequencies = coord_frequencies
        self.decoder_cross_attention = decoder_cross_attention
        self.time_attention_bias = time_attention_bias
        self.space_attention_rank = space_attention_rank
        self.linear_prior = linear_prior
        self.attention_layout = attention_layout
        self.norm_patch_loss = norm_patch_loss
        self.latent_loss_weight = latent_loss_weight
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.attention_backend = attention_backend
        super().__init__(**kwargs)
        self.validate_shape()

    @property
    def num_patches(self) -> int:
        """Time patches per parcel."""
        return self.window // self.patch_size

    def validate_shape(self) -> None:
        """Clear errors for values that cannot work (the CLI shows them as one line)."""
        ints = ("window", "patch_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size", "decoder_hidden_size",
                "decoder_num_hidden_layers", "decoder_num_attention_heads",
                "decoder_intermediate_size")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.window % self.patch_size:
            raise ConfigError(f"window {self.window} is not a multiple of patch_size "
                              f"{self.patch_size}")
        for width, heads, where in ((self.hidden_size, self.num_attention_heads, "encoder"),
                                    (self.decoder_hidden_size, self.decoder_num_attention_heads,
                                     "decoder")):
            if width % heads:
                raise ConfigError(f"{where} width {width} is not divisible by its {heads} heads")
        check_mask(self.mask_ratio, self.mask_strategy, self.future_patches, self.num_patches)
        if self.attention_backend not in ("sdpa", "eager"):
            raise ConfigError(f"attention backend {self.attention_backend!r} must be sdpa or eager")
        if not (isinstance(self.coord_frequencies, int) and 0 <= self.coord_frequencies <= 16):
            raise ConfigError(f"coord_frequencies must be an integer in [0, 16], got "
                              f"{self.coord_frequencies!r}")
        if not (isinstance(self.space_attention_rank, int) and self.space_attention_rank >= 0):
            raise ConfigError(f"space_attention_rank must be an integer >= 0, got "
                              f"{self.space_attention_rank!r}")
        if self.linear_prior and not getattr(self, "parcel_coords", None):
            raise ConfigError("linear_prior needs the atlas's parcel_coords in the config "
                              "(the prior is a covariance over those parcels)")
        if self.attention_layout not in ATTENTION_LAYOUTS:
            raise ConfigError(f"attention_layout {self.attention_layout!r} must be one of "
                              f"{', '.join(ATTENTION_LAYOUTS)}")
        if not (isinstance(self.latent_loss_weight, (int, float))
                and 0 <= self.latent_loss_weight < float("inf")):
            raise ConfigError(f"latent_loss_weight must be a number >= 0, got "
                              f"{self.latent_loss_weight!r}")
        if not isinstance(self.norm_patch_loss, bool):
            raise ConfigError(f"norm_patch_loss must be true or false, got "
                              f"{self.norm_patch_loss!r}")
        if not self.coord_scale > 0:
            raise ConfigError(f"coord_scale must be > 0, got {self.coord_scale}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BrainLMConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown profile '{name}' (use one of {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **RECIPE, **overrides})


def check_mask(ratio: float, strategy: str, future_patches: int, num_patches: int) -> None:
    if strategy not in MASK_STRATEGIES:
        raise ConfigError(f"mask strategy '{strategy}' must be one of {', '.join(MASK_STRATEGIES)}")
    if strategy == "future":
        if not 1 <= future_patches < num_patches:
            raise ConfigError(f"future_patches {future_patches} must be between 1 and "
                              f"{num_patches - 1} (patches per parcel)")
    elif not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
        raise ConfigError(f"mask ratio {ratio!r} must be in [0, 1)")
