"""The fused expert activation against transformers' own, on CPU."""
import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from steps.model import ModelConfig
from steps.modeling import _ClampedSwiGLU, fuse_expert_activation, load_model

pytestmark = pytest.mark.unit


def test_fused_activation_matches_transformers_values_and_gradients():
    torch.manual_seed(0)
    model = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0), vocab_size=64, dtype="float32", attn_implementation="eager",
                       device="cpu")
    experts = next(m for m in model.modules() if isinstance(m, GptOssExperts))
    # Values on both sides of the clamps (limit 7), and exactly on them, where clamp still passes the gradient.
    gate_up = torch.randn(64, 2 * experts.intermediate_size, dtype=torch.float64) * 6
    gate_up[0, :8] = torch.tensor([experts.limit, -experts.limit] * 4, dtype=torch.float64)
    grad_out = torch.randn(64, experts.intermediate_size, dtype=torch.float64)

    ours_in = gate_up.clone().requires_grad_()
    ref_in = gate_up.clone().requires_grad_()
    ours = _ClampedSwiGLU.apply(ours_in, experts.alpha, experts.limit)
    ref = GptOssExperts._apply_gate(experts, ref_in)
    ours.backward(grad_out)
    ref.backward(grad_out)
    assert (gate_up.abs() > experts.limit).any()  # the clamps are exercised
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-12, atol=1e-12)


def test_fused_model_gives_the_same_loss_and_gradients():
    def loss_and_grads(fuse: bool):
        model = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0), vocab_size=512, dtype="float32",
                           attn_implementation="eager", device="cpu")
        if fuse:
            fuse_expert_activation(model)
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        nodes, seen = [loss.grad_fn], set()
        while nodes:  # the autograd graph's node types
            node = nodes.pop()
            if node is not None and node not in seen:
                seen.add(node)
                nodes.extend(next_fn for next_fn, _ in node.next_functions)
        assert any(type(n).__name__ == "_ClampedSwiGLUBackward" for n in seen) == fuse
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if "experts" in n}

    loss_ref, grads_ref = loss_and_grads(fuse=False)
    loss_ours, grads_ours = loss_and_grads(fuse=True)
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-6, atol=0)
    assert grads_ours.keys() == grads_ref.keys() and grads_ref
    for name, grad in grads_ref.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_ours[name], grad, rtol=1e-5, atol=1e-7, msg=name)
