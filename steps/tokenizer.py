"""The gpt-oss tokenizer: the real one built offline from the o200k vocabulary in `bpe-openai`, or one from the Hub.

Also sets up openai-harmony to render offline (TIKTOKEN_ENCODINGS_BASE pointing at the same vocabulary file).
"""
import base64
import gzip
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from steps.model import ModelConfig

log = logging.getLogger("finetune")

OFFLINE = "o200k-offline"
# openai-harmony looks for exactly this file name under TIKTOKEN_ENCODINGS_BASE and checks this hash.
VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
NUM_BASE_TOKENS = 199_998
VOCAB_SIZE = 201_088

# o200k's pre-tokenisation regex (tiktoken_ext/openai_public.py, o200k_base); TikTokenConverter's default is cl100k's.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# The o200k_harmony special tokens (tiktoken's o200k_harmony = openai-harmony's HARMONY_GPT_OSS): every id from
# 199998 to 201087; 200018 keeps o200k_base's <|endofprompt|>.
_NAMED_SPECIALS = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
    200018: "<|endofprompt|>",
}
SPECIAL_TOKENS = {i: _NAMED_SPECIALS.get(i, f"<|reserved_{i}|>") for i in range(NUM_BASE_TOKENS, VOCAB_SIZE)}


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gpt-oss-finetune" / "tiktoken"


def _package_file(package: str, *parts: str) -> Path:
    # find_spec locates the package without importing it (importing trl pulls in half of the ML stack).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed; install the project's dependencies (pip install -e .)")
    return Path(spec.submodule_search_locations[0]).joinpath(*parts)


def o200k_file() -> Path:
    """The decompressed o200k vocabulary (`o200k_base.tiktoken`), written once into the cache folder."""
    path = cache_dir() / VOCAB_FILE
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == VOCAB_SHA256:
        return path
    data = gzip.decompress(_package_file("bpe_openai", "data", "o200k_base.tiktoken.gz").read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise ValueError(f"bpe-openai's o200k_base.tiktoken.gz decompresses to sha256 {digest}, expected {VOCAB_SHA256}; "
                         "reinstall the pinned bpe-openai version")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


class _O200kConverter(TikTokenConverter):
    # The base class reads the file with the `tiktoken` package; the format is just "base64(token) rank" per line.
    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        ranks = {}
        for line in Path(tiktoken_url).read_bytes().splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        return ranks


def _build_tokenizer_dir(out: Path) -> None:
    vocab = o200k_file()
    specials = [SPECIAL_TOKENS[i] for i in sorted(SPECIAL_TOKENS)]
    backend = _O200kConverter(str(vocab), pattern=O200K_PATTERN, extra_special_tokens=specials).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",  # as in openai/gpt-oss-*: generation ends on <|return|>; padding uses <|endoftext|>
        pad_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
        chat_template=_package_file("trl", "chat_templates", "gptoss.jinja").read_text(),
    )
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.convert_tokens_to_ids("<|start|>") == 200006, len(tokenizer)
    tokenizer.save_pretrained(out)


def offline_tokenizer_dir() -> Path:
    """A folder holding the offline gpt-oss tokenizer (built once into the cache: the BPE merge extraction takes a while)."""
    out = cache_dir() / f"gpt-oss-tokenizer-{VOCAB_SHA256[:12]}"
    if (out / "tokenizer.json").is_file():
        return out
    log.info("building the gpt-oss tokenizer from the o200k vocabulary into %s (once)", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _build_tokenizer_dir(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: its folder is as good as ours
            if not (out / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_offline_tokenizer() -> PreTrainedTokenizerFast:
    """The real gpt-oss tokenizer (201,088 ids, stock gpt-oss chat template), built with no network."""
    return PreTrainedTokenizerFast.from_pretrained(offline_tokenizer_dir())


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerFast:
    if model.tokenizer_source == OFFLINE:
        return build_offline_tokenizer()
    # model.revision pins `model.name`; a separately named tokenizer is taken at its default revision.
    revision = model.revision if model.tokenizer_source == model.name else None
    return AutoTokenizer.from_pretrained(model.tokenizer_source, revision=revision)


# Harmony writes a call's header as `to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>` (gpt-oss itself
# may put the recipient after the channel); TRL's gpt-oss response template, which `transformers serve` parses replies
# with, knows only the stock chat template's `commentary json`, and silently drops any other call.
HARMONY_CALL_OPEN = (r"(?:<\|channel\|>commentary\s*)?to=functions\.(?P<name>[^\s<]+)(?:<\|channel\|>commentary)?"
                     r"\s*(?:<\|constrain\|>)?json<\|message\|>")


def add_response_template(tokenizer):
    """TRL's gpt-oss response template (reasoning split off by `transformers serve`), parsing Harmony's tool calls too."""
    from trl.chat_template_utils import add_response_schema

    add_response_schema(tokenizer)
    assert tokenizer.response_template is not None, "TRL did not recognise the gpt-oss chat template"
    template = {**tokenizer.response_template, "fields": dict(tokenizer.response_template["fields"])}
    template["fields"]["tool_calls"] = {**template["fields"]["tool_calls"], "open_pattern": HARMONY_CALL_OPEN}
    tokenizer.response_template = template
    return tokenizer


def harmony_encoding():
    """openai-harmony's gpt-oss encoding, loaded offline from the cached o200k file unless TIKTOKEN_ENCODINGS_BASE is set."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    if not os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(o200k_file().parent)
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
