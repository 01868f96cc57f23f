"""The offline gpt-oss tokenizer against openai-harmony's own o200k_harmony encoding."""
import hashlib

import pytest

from steps import tokenizer as tk

pytestmark = pytest.mark.unit

SAMPLES = [
    "Hello, world! How's it going?",
    "Ça va très bien, merci. ¿Dónde está la estación? Größe und Übermaß.",
    "日本語の文章を正しく分割できますか？ 東京は晴れです。",
    "Привет, мир! Как дела?  Всё хорошо.",
    "def f(x):\n    return x ** 2\n\n\n\tindent  trailing   ",
    "numbers 1234567 and 3.14159, emoji 🙂🚀, symbols <>&%$#@!",
]


@pytest.fixture(scope="module")
def tok():
    return tk.build_offline_tokenizer()


@pytest.fixture(scope="module")
def enc():
    return tk.harmony_encoding()


def test_vocab_file_hash():
    path = tk.o200k_file()
    assert path.name == "o200k_base.tiktoken"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest.startswith("446a9538") and digest.endswith("1a2d")


def test_special_tokens(tok):
    assert len(tok) == 201_088
    ids = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
                                     "<|start|>", "<|end|>", "<|message|>", "<|call|>", "<|endofprompt|>",
                                     "<|reserved_200013|>", "<|reserved_201087|>"])
    assert ids == [199998, 199999, 200002, 200003, 200005, 200006, 200007, 200008, 200012, 200018, 200013, 201087]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|return|>", "<|endoftext|>", "<|startoftext|>")
    assert "<|start|>assistant" in tok.chat_template


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_and_parity_with_harmony(tok, enc, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert ids == enc.encode(text, disallowed_special=())


def test_special_ids_decode_like_harmony(tok, enc):
    ids = [200006, 200008, 200005, 200007, 200002, 200012, 199998, 200003, 200013, 201087]
    assert tok.decode(ids) == enc.decode(ids)
    # 200018 carries two names in o200k_harmony; openai-harmony decodes it as the reserved one, tiktoken and the
    # Hub tokenizer as <|endofprompt|>. Both encode to 200018.
    assert tok.decode([200018]) == "<|endofprompt|>" and enc.decode([200018]) == "<|reserved_200018|>"


def test_literal_special_text_parses_as_control_token_in_hf(tok, enc):
    # The HF tokenizer turns literal "<|end|>" into the control token (harmony does too with allowed_special="all");
    # the harmony step must therefore never run raw user text through tok(...) with special parsing on.
    text = "a <|end|> b"
    assert 200007 in tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False) == enc.encode(text, allowed_special="all")
    assert 200007 not in enc.encode(text, disallowed_special=())
