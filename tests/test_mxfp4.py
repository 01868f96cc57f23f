"""The MXFP4 encoder against the format's definition and transformers' decoder; byte-exact round trips of a release
checkpoint through the merge step."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from hub_layout import RELEASE_QUANTIZATION_CONFIG, decode, write_quantized_checkpoint
from steps import merge, mxfp4
from steps.contract import write_json_atomic
from steps.model import ModelConfig
from steps.modeling import load_model
from steps.tokenizer import build_offline_tokenizer
from steps.tracking import NullTracker

pytestmark = pytest.mark.unit
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


@pytest.fixture(scope="module")
def tokenizer():
    return build_offline_tokenizer()


def _nearest_e2m1(q: torch.Tensor) -> torch.Tensor:
    """Brute force: the E2M1 magnitude nearest to |q|; on a tie the one with the even code (mantissa bit 0)."""
    dist = (q.abs()[..., None] - E2M1).abs()
    best = dist.min(-1, keepdim=True).values
    candidates = torch.where(dist == best, torch.arange(8), 99)
    even = torch.where(candidates % 2 == 0, candidates, 99).min(-1).values
    return E2M1[torch.where(even < 99, even, candidates.min(-1).values)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_picks_the_smallest_scale_and_the_nearest_value(dtype):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(3, 40, 256, generator=gen) * torch.exp2(torch.randint(-12, 4, (3, 40, 1), generator=gen))).to(dtype)
    weight[0, 0, :32] = 0  # an all-zero block
    weight[0, 1, :32] = -0.0
    # Exact ties between two E2M1 values (times the block's scale, 1 here: the block's max is 6).
    weight[0, 2, :8] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    weight[0, 2, 8:32] = 0.1
    blocks, scales = mxfp4.quantize_mxfp4(weight)
    assert blocks.shape == (3, 40, 8, 16) and scales.shape == (3, 40, 8) and blocks.dtype == scales.dtype == torch.uint8

    x = weight.float().view(3, 40, 8, 32)
    scale = torch.exp2(scales.float() - 127)[..., None]
    amax = x.abs().amax(-1, keepdim=True)
    nonzero = amax > 0
    # The smallest power of two that holds the block's max without clipping: max <= 6 s, and 6 s / 2 would not.
    assert ((amax <= 6 * scale) & (amax > 3 * scale))[nonzero].all()
    assert (scales[~nonzero.squeeze(-1)] == 0).all()
    value = decode(blocks, scales).view_as(x)
    expected = _nearest_e2m1(x / scale) * scale * torch.where(torch.signbit(x), -1.0, 1.0)
    assert torch.equal(value, expected)
    assert torch.equal(value[0, 2, 0, :8], torch.tensor([6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]))  # ties to even
    assert torch.equal(torch.signbit(value), torch.signbit(x))  # -0.0 and small negatives keep their sign bit (code 8)
    assert ((value - x).norm() / x.norm()).item() < 0.15


def test_the_decoder_gives_the_independent_decoders_values():
    """steps.mxfp4.dequantize_mxfp4 (what train.expert_weights=mxfp4 decodes with) against tests/hub_layout.py's
    decode, written from the format's definition: every code, signed zeros, extreme scale bytes (2, 252) and an
    all-zero block with the encoder's scale byte 0."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (4, 9, 16), dtype=torch.uint8, generator=gen)
    blocks[0, 0] = torch.arange(16, dtype=torch.uint8) * 17  # codes 0..15, each in both nibbles
    scales = torch.randint(2, 253, (4, 9), dtype=torch.uint8, generator=gen)
    scales[0, 1], scales[0, 2], scales[0, 3] = 2, 252, 0
    blocks[0, 3] = 0
    expected = decode(blocks, scales)
    looked_up = mxfp4.dequantize_mxfp4(blocks, scales, torch.tensor(mxfp4.E2M1_VALUES))
    assert torch.equal(looked_up, expected) and torch.equal(torch.signbit(looked_up), torch.signbit(expected))
    in_bf16 = mxfp4.dequantize_mxfp4(blocks, scales, torch.tensor(mxfp4.E2M1_VALUES, dtype=torch.bfloat16))
    assert in_bf16.dtype == torch.bfloat16 and torch.equal(in_bf16.float(), expected)


@pytest.mark.gpu
def test_the_gpu_decoder_gives_the_table_lookups_bits():
    """steps/mxfp4_gpu.py's Triton kernel (what a GPU decodes MXFP4-held experts with) against the table lookup above,
    bit for bit in bf16 and float32: every code in both nibbles, signed zeros, every scale byte from 2 to 252, and a
    length that is no multiple of the kernel's tile (its masked tail)."""
    from steps.mxfp4_gpu import dequantize_mxfp4_gpu

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 251, 7, 16), dtype=torch.uint8, generator=gen)
    blocks[0, 0, 0] = torch.arange(16, dtype=torch.uint8) * 17
    scales = torch.arange(2, 253, dtype=torch.uint8).view(1, 251, 1).expand(3, 251, 7).contiguous()
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float32, torch.int32)):
        expected = mxfp4.dequantize_mxfp4(blocks, scales, torch.tensor(mxfp4.E2M1_VALUES, dtype=dtype))
        decoded = dequantize_mxfp4_gpu(blocks.cuda(), scales.cuda(), dtype).cpu()
        assert decoded.shape == expected.shape == (3, 251, 7 * 32)
        assert torch.equal(decoded.view(bits), expected.view(bits)), dtype


def test_transformers_decodes_what_the_encoder_wrote():
    """The loader that serves the export (transformers' own MXFP4 dequantization) reads our bytes as we meant them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    weight = torch.randn(4, 96, 64, generator=torch.Generator().manual_seed(1))  # (experts, out, in), as stored
    blocks, scales = mxfp4.quantize_mxfp4(weight)
    loaded = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (experts, in, out), as transformers keeps it
    assert torch.equal(loaded.transpose(1, 2), decode(blocks, scales))


def test_a_release_block_encodes_back_to_its_own_bytes():
    """Every block of the fixture is a release block: its decoded values re-encode to the same codes and scale."""
    gen = torch.Generator().manual_seed(2)
    from hub_layout import mxfp4 as release_blocks

    blocks, scales, value = release_blocks(8, 64, 128, gen)
    for dtype in (torch.float32, torch.bfloat16):  # both hold every MXFP4 value exactly
        again = mxfp4.quantize_mxfp4(value.to(dtype))
        assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


def _train_dir(path, *, model_dir: str, base_model: str, method: str):
    write_json_atomic(path / "manifest.json", {"step": "train", "fingerprint": "test", "inputs": {},
                                               "output": {"model_dir": model_dir, "base_model": base_model,
                                                          "base_revision": "", "method": method}})
    return path


def test_release_checkpoint_exported_without_training_is_byte_exact(tmp_path, tokenizer):
    """A release-layout checkpoint loaded (experts dequantized) and exported by merge.export=mxfp4, with no training
    in between: every tensor of the export, blocks and scales included, equals the source's byte for byte."""
    source, _ = write_quantized_checkpoint(tmp_path / "train" / "release", RELEASE_QUANTIZATION_CONFIG,
                                           vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "train" / "release")
    train_dir = _train_dir(tmp_path / "train", model_dir="release", base_model="release", method="full")

    # bf16, as the source's other weights: the merge and the reloaded export then compute the very same logits.
    out = merge.run(merge.Config(model=ModelConfig(name=str(train_dir / "release")), dtype="bfloat16", export="mxfp4"),
                    out_dir=tmp_path / "merge", inputs={"train": train_dir}, tracker=NullTracker())

    exported = load_file(tmp_path / "merge" / "model" / "model.safetensors")
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert sum(name.endswith("_blocks") for name in exported) == 4
    assert (source["model.layers.0.mlp.experts.gate_up_proj_blocks"] & 0x0F == 8).any()  # -0 codes survived too
    assert out.retention["retention"] is None  # nothing was trained: nothing to keep, nothing refused
    assert out.retention["eval_loss_mxfp4"] == out.retention["eval_loss_merged"]
    print(f"round trip: {len(source)} tensors byte-identical, {out.num_bytes} bytes")


def test_lora_on_some_experts_leaves_the_others_byte_exact(tmp_path, tokenizer):
    """The recipe trains the experts of 3 of 24 layers: the other layers' experts go out as the release shipped them."""
    source, _ = write_quantized_checkpoint(tmp_path / "train" / "base", RELEASE_QUANTIZATION_CONFIG,
                                           vocab_size=len(tokenizer))
    net = load_model(ModelConfig(name=str(tmp_path / "train" / "base")), vocab_size=len(tokenizer), dtype="float32",
                     attn_implementation="eager", device="cpu")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        target_parameters=["layers.0.mlp.experts.gate_up_proj", "layers.0.mlp.experts.down_proj"])
    get_peft_model(net, config).save_pretrained(tmp_path / "train" / "model")
    tokenizer.save_pretrained(tmp_path / "train" / "model")
    train_dir = _train_dir(tmp_path / "train", model_dir="model", base_model="base", method="lora")

    out = merge.run(merge.Config(model=ModelConfig(name=str(train_dir / "base")), dtype="float32", export="mxfp4",
                                 probe_tolerance=1e-3, min_retention=-100.0),
                    out_dir=tmp_path / "merge", inputs={"train": train_dir}, tracker=NullTracker())

    exported = load_file(tmp_path / "merge" / "model" / "model.safetensors")
    for suffix in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
        assert torch.equal(exported[f"model.layers.1.mlp.experts.{suffix}"], source[f"model.layers.1.mlp.experts.{suffix}"])
        assert not torch.equal(exported[f"model.layers.0.mlp.experts.{suffix}"], source[f"model.layers.0.mlp.experts.{suffix}"])
    assert out.retention["retention"] is not None and out.retention["kl_merged_vs_base"] > 0


@pytest.mark.parametrize("num_bytes, gpu", [(13_761_000_000, "16 GB"), (41_800_000_000, "48 GB"),
                                            (65_000_000_000, "80 GB"), (234_000_000_000, "none single")])
def test_smallest_gpu(num_bytes, gpu):
    """gpt-oss-20b in MXFP4 (13.8 GB) fits 16 GB and its bf16 merge 48 GB; gpt-oss-120b in MXFP4 fits 80 GB."""
    assert mxfp4.smallest_gpu(num_bytes).startswith(gpu)


def test_quantization_config_is_the_releases():
    assert mxfp4.RELEASE_QUANTIZATION_CONFIG == RELEASE_QUANTIZATION_CONFIG


def test_a_gpt_oss_20b_layer_gets_the_release_names_dtypes_and_shapes():
    """One expert of each of a gpt-oss-20b layer's projections (a whole layer would take seconds): the export's
    tensors are openai/gpt-oss-20b's, less the expert count (bench/results/h200-2026-12-01-mxfp4-export-fp32-merge-* checked all 32 on a GPU)."""
    from hub_layout import GPT_OSS_20B_EXPERTS

    prefix = "model.layers.0.mlp.experts."
    layer = {f"{prefix}gate_up_proj": torch.randn(1, 2880, 5760), f"{prefix}gate_up_proj_bias": torch.zeros(1, 5760),
             f"{prefix}down_proj": torch.randn(1, 2880, 2880), f"{prefix}down_proj_bias": torch.zeros(1, 2880)}
    exported = mxfp4.release_state_dict(layer)
    assert {k.removeprefix(prefix): (v.dtype, tuple(v.shape)) for k, v in exported.items()} == {
        k: (dtype, (1, *shape[1:])) for k, (dtype, shape) in GPT_OSS_20B_EXPERTS.items()}
