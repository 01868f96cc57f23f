"""Which model and tokenizer a run uses (the profile's `model` section), and how to load them."""
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str
    """Hub id (e.g. openai/gpt-oss-20b), a local checkpoint folder, or "random" for a random-weight gpt-oss of `random_shape`."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of `name`; ignored for local folders and "random"."""
    tokenizer: str = ""
    """Hub id or local folder of the tokenizer; "o200k-offline" builds the real gpt-oss tokenizer offline; empty means `name`."""
    random_shape: dict = field(default_factory=dict)
    """GptOssConfig overrides for name=random (e.g. num_hidden_layers, hidden_size, head_dim)."""
    seed: int = 0
    """Seed of the random-weight model's initialisation."""

    def __post_init__(self):
        if self.name == "random" and not self.tokenizer:
            raise ValueError('model.tokenizer is required when model.name=random; set model.tokenizer=o200k-offline')
        if self.random_shape and self.name != "random":
            raise ValueError(f"model.random_shape only applies to model.name=random (got name={self.name!r}); remove model.random_shape")

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer or self.name
