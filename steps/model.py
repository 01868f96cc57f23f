"""Which model and tokenizer a run uses (the profile's `model` section) and the gpt-oss shapes a random model takes.

Pure configuration, no torch: loading a profile (and the CPU-only steps) stays fast; steps/modeling.py loads models.
"""
from dataclasses import dataclass, field

# The exact shape of openai/gpt-oss-20b's config.json (its rope_parameters are GptOssConfig's defaults: yarn, factor 32,
# theta 150k, original context 4096; layer_types default to alternating sliding/full attention, window 128).
GPT_OSS_20B_SHAPE = {
    "num_hidden_layers": 24,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "swiglu_limit": 7.0,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.9,
    "initializer_range": 0.02,
}
# openai/gpt-oss-120b differs only in depth and expert count.
GPT_OSS_120B_SHAPE = {**GPT_OSS_20B_SHAPE, "num_hidden_layers": 36, "num_local_experts": 128}
# Small enough to train in seconds on a CPU, still every gpt-oss feature: sinks, sliding + full layers, top-k experts.
TINY_SHAPE = {
    **GPT_OSS_20B_SHAPE,
    "num_hidden_layers": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "hidden_size": 64,
    "intermediate_size": 64,
    "head_dim": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 16,
    "max_position_embeddings": 4096,
}
SHAPE_PRESETS = {"tiny": TINY_SHAPE, "gpt-oss-20b": GPT_OSS_20B_SHAPE, "gpt-oss-120b": GPT_OSS_120B_SHAPE}
# The fields of transformers 5.23's GptOssConfig, written out so a profile is checked without importing transformers
# (and torch with it: ~8 s); tests/test_modeling.py holds the list to the installed class.
GPT_OSS_CONFIG_FIELDS = frozenset({
    "architectures", "attention_bias", "attention_dropout", "bos_token_id", "chunk_size_feed_forward", "dtype",
    "eos_token_id", "head_dim", "hidden_act", "hidden_size", "id2label", "initializer_range", "intermediate_size",
    "is_encoder_decoder", "label2id", "layer_types", "max_position_embeddings", "num_attention_heads",
    "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads", "num_local_experts", "output_hidden_states",
    "output_router_logits", "pad_token_id", "problem_type", "return_dict", "rms_norm_eps", "rope_parameters",
    "router_aux_loss_coef", "sliding_window", "swiglu_alpha", "swiglu_limit", "tie_word_embeddings",
    "transformers_version", "use_cache", "vocab_size"})
# Weight dtypes a gpt-oss model trains and merges in (steps/modeling.py maps them to torch dtypes).
DTYPE_NAMES = ("bfloat16", "float32")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str
    """Hub id (e.g. openai/gpt-oss-20b), a local checkpoint folder, or "random" for a random-weight gpt-oss of `random_shape`."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of `name`; ignored for local folders and "random"."""
    tokenizer: str = ""
    """Hub id or local folder of the tokenizer; "o200k-offline" builds the real gpt-oss tokenizer offline; empty means `name`."""
    random_shape: dict = field(default_factory=dict)
    """Shape of the name=random model: `preset` (tiny | gpt-oss-20b | gpt-oss-120b; default tiny) plus GptOssConfig
    overrides, e.g. {preset: gpt-oss-20b, num_hidden_layers: 4}. The vocabulary size always comes from the tokenizer."""
    seed: int = 0
    """Seed of the random-weight model's initialisation."""

    def __post_init__(self):
        if self.name == "random" and not self.tokenizer:
            raise ValueError('model.tokenizer is required when model.name=random; set model.tokenizer=o200k-offline')
        if self.random_shape and self.name != "random":
            raise ValueError(f"model.random_shape only applies to model.name=random (got name={self.name!r}); remove model.random_shape")
        preset = self.random_shape.get("preset", "tiny")
        if preset not in SHAPE_PRESETS:
            raise ValueError(f"model.random_shape.preset={preset!r} is unknown; choose one of {', '.join(SHAPE_PRESETS)}")
        if "vocab_size" in self.random_shape:
            raise ValueError("model.random_shape.vocab_size is set from the tokenizer; remove it")
        unknown = sorted(set(self.random_shape) - GPT_OSS_CONFIG_FIELDS - {"preset"})
        if unknown:
            raise ValueError(f"model.random_shape.{unknown[0]} is not a GptOssConfig field; use preset or one of "
                             f"{', '.join(sorted(GPT_OSS_CONFIG_FIELDS & set(GPT_OSS_20B_SHAPE)))}")

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer or self.name
