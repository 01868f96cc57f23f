"""The fast expert path against transformers' own, on CPU (and on CUDA, marked gpu)."""
import contextlib
import copy
from unittest import mock

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from steps.model import ModelConfig
from steps.modeling import _ClampedSwiGLU, fast_experts, load_model, lora_experts, pack_experts
from steps.mxfp4 import E2M1_VALUES, dequantize_mxfp4, quantize_mxfp4
from hub_layout import RELEASE_QUANTIZATION_CONFIG, write_quantized_checkpoint

pytestmark = pytest.mark.unit


def test_fused_activation_matches_transformers_values_and_gradients():
    torch.manual_seed(0)
    model = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0), vocab_size=64, dtype="float32", attn_implementation="eager",
                       device="cpu")
    experts = next(m for m in model.modules() if isinstance(m, GptOssExperts))
    # Values on both sides of the clamps (limit 7), and exactly on them, where clamp still passes the gradient.
    gate_up = torch.randn(64, 2 * experts.intermediate_size, dtype=torch.float64) * 6
    gate_up[0, :8] = torch.tensor([experts.limit, -experts.limit] * 4, dtype=torch.float64)
    gate_up[0, 8:] = 0  # with a zero bias below, row 0 meets the clamps exactly
    grad_out = torch.randn(64, experts.intermediate_size, dtype=torch.float64)
    bias = torch.randn(4, 2 * experts.intermediate_size, dtype=torch.float64)
    bias[0] = 0
    expert_ids = torch.sort(torch.randint(0, 4, (64,)))[0]
    expert_ids[0] = 0

    ours_in, ours_bias = gate_up.clone().requires_grad_(), bias.clone().requires_grad_()
    ref_in, ref_bias = gate_up.clone().requires_grad_(), bias.clone().requires_grad_()
    delta = torch.randn_like(gate_up)  # LoRA's low-rank term, added inside
    delta[0] = 0  # row 0 still meets the clamps exactly
    ours_delta, ref_delta = delta.clone().requires_grad_(), delta.clone().requires_grad_()
    ours, _ = _ClampedSwiGLU.apply(ours_in, ours_delta, ours_bias, expert_ids, experts.alpha, experts.limit)
    ref = GptOssExperts._apply_gate(experts, ref_in + ref_delta + ref_bias[expert_ids])
    ours.backward(grad_out)
    ref.backward(grad_out)
    assert (gate_up.abs() > experts.limit).any()  # the clamps are exercised
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_bias.grad, ref_bias.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_delta.grad, ref_delta.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reference", ["eager", "grouped_mm"])
def test_fast_experts_give_transformers_loss_and_gradients(reference):
    """Against both of transformers' expert paths: the per-expert loop and the grouped GEMMs."""
    def loss_and_grads(fuse: bool):
        model = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0), vocab_size=512, dtype="float32",
                           attn_implementation="eager", device="cpu")
        model.set_experts_implementation(reference)
        with torch.no_grad():  # initialised to 0; random, so the paths' bias terms are compared too
            gen = torch.Generator().manual_seed(2)
            for name, param in model.named_parameters():
                if name.endswith("_bias"):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        if fuse:
            fast_experts(model)
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        nodes, seen = [loss.grad_fn], set()
        while nodes:  # the autograd graph's node types
            node = nodes.pop()
            if node is not None and node not in seen:
                seen.add(node)
                nodes.extend(next_fn for next_fn, _ in node.next_functions)
        names = {type(n).__name__ for n in seen}
        assert ({"_ClampedSwiGLUBackward", "_RouteRowsBackward", "_UnrouteBackward"} <= names) == fuse
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_ref, grads_ref = loss_and_grads(fuse=False)
    loss_ours, grads_ours = loss_and_grads(fuse=True)
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-6, atol=0)
    assert grads_ours.keys() == grads_ref.keys() and any("router" in n for n in grads_ref)
    for name, grad in grads_ref.items():
        assert grad.abs().sum() > 0, name  # experts, router (through the routing weights), attention, embeddings
        torch.testing.assert_close(grads_ours[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _graph_node_names(tensor):
    nodes, seen = [tensor.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is not None and node not in seen:
            seen.add(node)
            nodes.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_expert_lora_inside_the_grouped_gemms_gives_peft_loss_gradients_and_adapter(dtype, tmp_path):
    """lora_experts against PEFT's own expert LoRA (W + scale * A @ B materialized per forward) on CPU: the same loss
    and every LoRA gradient (attention adapters, expert adapters of every layer); no full-size expert weight is built;
    the saved adapter loads in plain PEFT and gives the same logits, merged or not. float64 runs the grouped GEMMs as
    transformers' per-expert loop (F.grouped_mm has no float64), exact to rounding; float32 through F.grouped_mm,
    where the two orders of summation ((x A) B against x (W + A B)) differ by rounding."""
    from peft import LoraConfig, PeftModel, get_peft_model

    import steps.modeling

    shape = {"preset": "tiny", "num_hidden_layers": 3, "num_local_experts": 4, "num_experts_per_tok": 2}
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    tol = 1e-10 if dtype == "float64" else 1e-5

    def base():
        model = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0, random_shape=shape),
                           vocab_size=512, dtype="float32", attn_implementation="eager", device="cpu")
        fast_experts(model)
        return model.to(getattr(torch, dtype))

    def lora_model(fused: bool):
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", target_parameters=[
            f"layers.{i}.mlp.experts.{p}" for i in range(3) for p in ("gate_up_proj", "down_proj")])
        model = get_peft_model(base(), config)
        with torch.no_grad():  # PEFT starts lora_B at 0, which would leave lora_A's gradient 0: train-like values
            gen = torch.Generator().manual_seed(3)
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        if fused:
            assert lora_experts(model) == 3  # one chain of ParamWrappers per layer's experts
        return model

    def loss_and_grads(model):
        loss = model(input_ids=ids, labels=ids).loss
        names = _graph_node_names(loss)
        loss.backward()
        return loss.detach(), names, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def rel_err(a, b):
        return float((a - b).norm() / b.norm())

    loop = torch.ops.transformers.grouped_mm_fallback
    with mock.patch.object(steps.modeling, "_grouped_mm", loop) if dtype == "float64" else contextlib.nullcontext():
        loss_ref, names_ref, grads_ref = loss_and_grads(lora_model(fused=False))
        ours = lora_model(fused=True)
        loss_ours, names_ours, grads_ours = loss_and_grads(ours)
        # PEFT builds W + scale * A @ B with one baddbmm per targeted parameter; ours never does.
        assert "BaddbmmBackward0" in names_ref and "BaddbmmBackward0" not in names_ours
        assert rel_err(loss_ours, loss_ref) <= tol
        assert len([n for n in grads_ref if ".experts." in n]) == 3 * 2 * 2  # lora_A, lora_B of both parameters
        assert grads_ours.keys() == grads_ref.keys()
        for name, grad in grads_ref.items():
            assert grad.abs().sum() > 0, name
            assert rel_err(grads_ours[name], grad) <= tol, name

        ours.save_pretrained(tmp_path / "adapter")
        with torch.no_grad():
            logits = ours(input_ids=ids).logits
            loaded = PeftModel.from_pretrained(base(), tmp_path / "adapter")  # plain PEFT: its own expert forward
            assert rel_err(loaded(input_ids=ids).logits, logits) <= tol
            merged = loaded.merge_and_unload()
            assert rel_err(merged(input_ids=ids).logits, logits) <= tol


def _round_experts_to_mxfp4(model):
    lut = torch.tensor(E2M1_VALUES, device=model.device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GptOssExperts):
                for weight in (module.gate_up_proj, module.down_proj):
                    for expert in weight:
                        expert.copy_(dequantize_mxfp4(*quantize_mxfp4(expert.T), lut).T)
    return model


def test_experts_held_in_mxfp4_give_the_decoded_models_loss_and_lora_gradients():
    """pack_experts against the same model with its experts as float32 values (both MXFP4-exact), LoRA on attention
    and every layer's experts inside the grouped GEMMs: the same loss and every LoRA gradient (float32, CPU); the
    packed model keeps no full-size expert weight; PEFT's own expert forward, which would read the placeholder, is
    refused; a model whose experts are not MXFP4 values is refused rather than rounded."""
    from peft import LoraConfig, get_peft_model

    shape = {"preset": "tiny", "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2}
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))

    def base():
        return load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0, random_shape=shape),
                          vocab_size=512, dtype="float32", attn_implementation="eager", device="cpu")

    with pytest.raises(ValueError, match="experts.gate_up_proj .expert 0. holds values that are not MXFP4 values.*"
                                         "set train.expert_weights=dtype"):
        pack_experts(base(), exact=True)

    def lora_model(packed: bool):
        model = _round_experts_to_mxfp4(base())
        fast_experts(model)
        if packed:
            # 2 layers x 4 experts x (64 x 128 gate_up + 64 x 64 down) weights, 16 + 1 bytes per block of 32
            assert pack_experts(model, exact=True) == 2 * 4 * 3 * 64 * 64 * 17 // 32
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", target_parameters=[
            f"layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")])
        model = get_peft_model(model, config)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(3)
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        assert lora_experts(model) == 2
        return model

    def loss_and_grads(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = loss_and_grads(lora_model(packed=False))
    packed = lora_model(packed=True)
    loss_ours, grads_ours = loss_and_grads(packed)
    assert torch.allclose(loss_ours, loss_ref, rtol=1e-6, atol=0)
    assert grads_ours.keys() == grads_ref.keys() and len([n for n in grads_ref if ".experts." in n]) == 2 * 2 * 2
    for name, grad in grads_ref.items():
        assert grad.abs().sum() > 0, name
        assert float((grads_ours[name] - grad).norm() / grad.norm()) <= 1e-5, name
    experts = [m for m in packed.modules() if isinstance(m, GptOssExperts)]
    assert len(experts) == 2 and all(m.gate_up_proj.untyped_storage().nbytes() <= 4 for m in experts)
    with packed.disable_adapter(), pytest.raises(RuntimeError, match="cannot run on experts held in MXFP4"):
        packed(input_ids=ids)


def test_an_mxfp4_checkpoint_held_packed_keeps_the_release_bytes(tmp_path):
    """A checkpoint in the Hub layout, dequantized on load and packed again (exact=True): the blocks and scales are the
    file's own bytes, so holding the experts in MXFP4 changes nothing about the model."""
    from safetensors.torch import load_file

    write_quantized_checkpoint(tmp_path, RELEASE_QUANTIZATION_CONFIG)
    stored = load_file(tmp_path / "model.safetensors")
    net = load_model(ModelConfig(name=str(tmp_path), tokenizer="o200k-offline"), vocab_size=512, dtype="bfloat16",
                     attn_implementation="eager", device="cpu")
    pack_experts(net, exact=True)
    state = net.state_dict()
    names = [n for n in stored if n.endswith(("_blocks", "_scales"))]
    assert len(names) == 8
    for name in names:
        assert torch.equal(state[name], stored[name]), name


def test_an_mxfp4_checkpoint_loads_packed_without_decoding_its_experts(tmp_path):
    """load_model(packed_experts=True) on a checkpoint in the Hub layout reads the experts' blocks and scales straight
    from the files, without transformers' loader (which decodes them to bf16 first), into the same model as the
    decode-then-pack route: every tensor, the logits; a checkpoint missing a tensor is refused by name."""
    from safetensors.torch import load_file, save_file

    write_quantized_checkpoint(tmp_path / "ckpt", RELEASE_QUANTIZATION_CONFIG)
    kwargs = dict(vocab_size=512, dtype="bfloat16", attn_implementation="eager", device="cpu")
    reference = load_model(ModelConfig(name=str(tmp_path / "ckpt"), tokenizer="o200k-offline"), **kwargs)
    pack_experts(reference, exact=True)
    with mock.patch("steps.modeling.AutoModelForCausalLM.from_pretrained", side_effect=AssertionError("decoded")):
        net = load_model(ModelConfig(name=str(tmp_path / "ckpt"), tokenizer="o200k-offline"), packed_experts=True,
                         **kwargs)
    expected, got = reference.state_dict(), net.state_dict()
    assert got.keys() == expected.keys() and len([k for k in got if k.endswith("_blocks")]) == 4
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert all(m.gate_up_proj.untyped_storage().nbytes() <= 4 for m in net.modules() if isinstance(m, GptOssExperts))
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(net(input_ids=ids).logits, reference(input_ids=ids).logits)

    (tmp_path / "ckpt" / "model.safetensors").rename(tmp_path / "full.safetensors")
    tensors = load_file(tmp_path / "full.safetensors")
    del tensors["model.layers.1.self_attn.sinks"]
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack \['model.layers.1.self_attn.sinks'\].*set train.expert_weights=dtype"):
        load_model(ModelConfig(name=str(tmp_path / "ckpt"), tokenizer="o200k-offline"), packed_experts=True, **kwargs)


@pytest.mark.gpu
def test_fast_experts_on_gpu_are_as_accurate_as_transformers_in_bf16():
    """On CUDA (compiled activation kernels, F.grouped_mm) at gpt-oss-20b width, 2 layers: against an fp32 run of
    transformers' per-expert loop, our bf16 loss and expert/router gradients are no further off than transformers'
    own bf16 grouped_mm path."""
    base = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0,
                                  random_shape={"preset": "gpt-oss-20b", "num_hidden_layers": 2}),
                      vocab_size=201088, dtype="float32", attn_implementation="eager", device="cuda")
    ids = torch.randint(0, 199998, (2, 512), generator=torch.Generator().manual_seed(1)).cuda()

    def loss_and_grads(dtype, experts_implementation, fast=False):
        model = copy.deepcopy(base).to(dtype)
        model.set_experts_implementation(experts_implementation)
        if fast:
            fast_experts(model)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if ".mlp." in n])
        return loss.item(), grads

    loss_ref, grads_ref = loss_and_grads(torch.float32, "eager")
    loss_tf, grads_tf = loss_and_grads(torch.bfloat16, "grouped_mm")
    loss_ours, grads_ours = loss_and_grads(torch.bfloat16, "grouped_mm", fast=True)
    err_tf = ((grads_tf - grads_ref).norm() / grads_ref.norm()).item()
    err_ours = ((grads_ours - grads_ref).norm() / grads_ref.norm()).item()
    print(f"loss fp32 {loss_ref:.6f} bf16 transformers {loss_tf:.6f} ours {loss_ours:.6f}; "
          f"gradient rel. error transformers {err_tf:.2e} ours {err_ours:.2e}")
    assert err_ours <= 1.5 * err_tf + 1e-3
    assert abs(loss_ours - loss_ref) <= 1.5 * abs(loss_tf - loss_ref) + 1e-3 * loss_ref


@pytest.mark.gpu
def test_expert_lora_on_gpu_is_as_accurate_as_peft_in_bf16_without_its_weight_copies():
    """On CUDA (F.grouped_mm) at gpt-oss-20b width, 2 layers, LoRA on attention and both layers' experts: against an
    fp32 run of PEFT's own path, lora_experts' bf16 loss and LoRA gradients are no further off than PEFT's bf16 path,
    and its peak memory is lower by most of the full-size expert weights PEFT builds (W + scale * A @ B: 1.6 GB a
    layer, kept for the backward pass)."""
    from peft import LoraConfig, get_peft_model

    base = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0,
                                  random_shape={"preset": "gpt-oss-20b", "num_hidden_layers": 2}),
                      vocab_size=201088, dtype="float32", attn_implementation="eager", device="cuda")
    base.set_experts_implementation("eager")  # the fp32 reference: transformers' per-expert loop under PEFT's own LoRA
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", target_parameters=[
        f"layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")])
    reference = get_peft_model(base, config)
    with torch.no_grad():
        gen = torch.Generator(device="cuda").manual_seed(3)
        for name, param in reference.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen, device="cuda") * 0.02)
    ids = torch.randint(0, 199998, (2, 512), generator=torch.Generator().manual_seed(1)).cuda()

    def loss_grads_peak(model, fused=False):
        if fused:
            assert lora_experts(model) == 2
        if model.dtype == torch.bfloat16:
            fast_experts(model)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if "lora_" in n])
        return loss.item(), grads, (torch.cuda.max_memory_allocated() - start) / 2**30

    bf16_peft, bf16_ours = copy.deepcopy(reference).bfloat16(), copy.deepcopy(reference).bfloat16()
    loss_ref, grads_ref, _ = loss_grads_peak(reference)
    loss_peft, grads_peft, peak_peft = loss_grads_peak(bf16_peft)
    del bf16_peft
    loss_ours, grads_ours, peak_ours = loss_grads_peak(bf16_ours, fused=True)
    err_peft = ((grads_peft - grads_ref).norm() / grads_ref.norm()).item()
    err_ours = ((grads_ours - grads_ref).norm() / grads_ref.norm()).item()
    print(f"loss fp32 {loss_ref:.6f} bf16 PEFT {loss_peft:.6f} ours {loss_ours:.6f}; LoRA gradient rel. error PEFT "
          f"{err_peft:.2e} ours {err_ours:.2e}; peak above the weights PEFT {peak_peft:.2f} GiB ours {peak_ours:.2f} GiB")
    assert err_ours <= 1.5 * err_peft + 1e-3
    assert abs(loss_ours - loss_ref) <= 1.5 * abs(loss_peft - loss_ref) + 1e-3 * loss_ref
    # PEFT's W + scale * A @ B of two layers in bf16: 2 x 1.48 GiB; at least 2 of those 2.97 GiB must be gone
    assert peak_ours <= peak_peft - 2.0


@pytest.mark.gpu
def test_experts_held_in_mxfp4_on_gpu_match_the_decoded_bf16_model_in_a_quarter_of_its_memory():
    """On CUDA (the compiled decoder, F.grouped_mm) at gpt-oss-20b width, 2 layers, LoRA on attention and both layers'
    experts: holding the (MXFP4-exact) experts packed gives the bf16 model's loss and LoRA gradients to bf16 rounding,
    and the experts take 17/64 of their bf16 bytes."""
    from peft import LoraConfig, get_peft_model

    base = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0,
                                  random_shape={"preset": "gpt-oss-20b", "num_hidden_layers": 2}),
                      vocab_size=201088, dtype="bfloat16", attn_implementation="eager", device="cuda")
    _round_experts_to_mxfp4(base)
    fast_experts(base)
    ids = torch.randint(0, 199998, (2, 512), generator=torch.Generator().manual_seed(1)).cuda()
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", target_parameters=[
        f"layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")])

    def loss_and_grads(model):
        model = get_peft_model(model, config)
        with torch.no_grad():
            gen = torch.Generator(device="cuda").manual_seed(3)
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen, device="cuda") * 0.02)
        assert lora_experts(model) == 2
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if "lora_" in n])

    packed = copy.deepcopy(base)
    before = torch.cuda.memory_allocated()
    num_bytes = pack_experts(packed, exact=True)
    freed = before - torch.cuda.memory_allocated()
    bf16_bytes = 2 * 3 * 2880 * 2880 * 32 * 2  # 2 layers x (gate_up + down) x 32 experts in bf16
    loss_bf16, grads_bf16 = loss_and_grads(base)
    loss_packed, grads_packed = loss_and_grads(packed)
    err = ((grads_packed - grads_bf16).norm() / grads_bf16.norm()).item()
    print(f"loss bf16 experts {loss_bf16:.6f} MXFP4-held {loss_packed:.6f}; LoRA gradient rel. difference {err:.2e}; "
          f"experts {num_bytes / 2**30:.3f} GiB held, {freed / 2**30:.3f} GiB freed by packing")
    assert num_bytes == 2 * 3 * 2880 * 2880 * 32 * 17 // 32
    assert freed >= bf16_bytes - num_bytes - 2**20
    assert abs(loss_packed - loss_bf16) <= 1e-3 * loss_bf16
    assert err <= 2e-2


def test_mxfp4_checkpoint_loads_with_experts_dequantized_and_trainable(tmp_path):
    """The Hub's gpt-oss checkpoints store experts in MXFP4: load_model dequantizes them exactly (every value is a
    4-bit code times a power of two) into plain, trainable experts and leaves the other weights as stored."""
    tensors, experts = write_quantized_checkpoint(tmp_path, RELEASE_QUANTIZATION_CONFIG)
    net = load_model(ModelConfig(name=str(tmp_path), tokenizer="o200k-offline"), vocab_size=512, dtype="bfloat16",
                     attn_implementation="eager", device="cpu")
    loaded = net.state_dict()
    assert len(experts) == 4
    for name, value in experts.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name].float(), value), name
        assert type(net.get_submodule(name.rsplit(".", 1)[0])) is GptOssExperts
    for name, tensor in tensors.items():
        if not name.endswith(("_blocks", "_scales")):
            assert torch.equal(loaded[name], tensor), name
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    net(input_ids=ids, labels=ids).loss.backward()
    for name in experts:
        assert net.get_parameter(name).grad.abs().sum() > 0, name


def test_checkpoint_in_another_quantization_is_refused(tmp_path):
    write_quantized_checkpoint(tmp_path, {"quant_method": "fp8"})
    with pytest.raises(ValueError, match="quantized with fp8; only MXFP4 .dequantized on load. or unquantized"):
        load_model(ModelConfig(name=str(tmp_path), tokenizer="o200k-offline"), vocab_size=512, dtype="bfloat16",
                   attn_implementation="eager", device="cpu")


@pytest.mark.unit
def test_the_written_out_gpt_oss_config_fields_are_the_installed_ones():
    """steps.model checks model.random_shape against a list (no transformers import); it must be GptOssConfig's."""
    import dataclasses

    from transformers import GptOssConfig

    from steps.model import GPT_OSS_CONFIG_FIELDS

    assert GPT_OSS_CONFIG_FIELDS == {f.name for f in dataclasses.fields(GptOssConfig)}
