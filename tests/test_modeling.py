"""The fast expert path against transformers' own, on CPU (and on CUDA, marked gpu)."""
import copy

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from steps.model import ModelConfig
from steps.modeling import _ClampedSwiGLU, fast_experts, load_model
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
    ours = _ClampedSwiGLU.apply(ours_in, ours_bias, expert_ids, experts.alpha, experts.limit)
    ref = GptOssExperts._apply_gate(experts, ref_in + ref_bias[expert_ids])
    ours.backward(grad_out)
    ref.backward(grad_out)
    assert (gate_up.abs() > experts.limit).any()  # the clamps are exercised
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_bias.grad, ref_bias.grad, rtol=1e-12, atol=1e-12)


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
