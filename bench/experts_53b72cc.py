"""The expert path of main at 53b72cc (before the fused expert epilogues), verbatim, for before/after measurements in
one process: bench/train_throughput.py --baseline-experts NAME runs configuration NAME with it."""
import torch
from transformers.integrations.moe import _grouped_mm
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from steps.modeling import _RouteRows, _clamped_swiglu, _clamped_swiglu_grad

# On GPU each direction compiles to one elementwise kernel; the row count varies (marked dynamic), the width does not.
_clamped_swiglu_cuda = torch.compile(_clamped_swiglu)
_clamped_swiglu_grad_cuda = torch.compile(_clamped_swiglu_grad)


class _ClampedSwiGLU(torch.autograd.Function):
    """The expert activation keeping only its input for the backward pass.

    Autograd through the eager activation (2 clamps, sigmoid, 3 products, an add on strided halves) keeps ~5 tensors
    per routed token; 4 routed tokens per token make that most of a gpt-oss layer's activation memory. This keeps
    gate_up alone and recomputes the rest in the backward pass, which on GPU is one fused kernel each way.
    """

    @staticmethod
    def forward(ctx, gate_up, alpha, limit):
        ctx.save_for_backward(gate_up)
        ctx.alpha, ctx.limit = alpha, limit
        if not gate_up.is_cuda:
            return _clamped_swiglu(gate_up, alpha, limit)
        torch._dynamo.mark_dynamic(gate_up, 0)
        return _clamped_swiglu_cuda(gate_up, alpha, limit)

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        grad = grad.contiguous()
        if not gate_up.is_cuda:
            return _clamped_swiglu_grad(gate_up, grad, ctx.alpha, ctx.limit), None, None
        torch._dynamo.mark_dynamic(gate_up, 0)
        torch._dynamo.mark_dynamic(grad, 0)
        return _clamped_swiglu_grad_cuda(gate_up, grad, ctx.alpha, ctx.limit), None, None


def _experts_forward(self: GptOssExperts, hidden_states: torch.Tensor, router_indices: torch.Tensor,
                     routing_weights: torch.Tensor) -> torch.Tensor:
    """GptOssExperts.forward as transformers' grouped_mm path computes it (tokens sorted by expert, one grouped GEMM
    per projection), with the routing through _RouteRows and the activation through _ClampedSwiGLU."""
    num_tokens, hidden_size = hidden_states.shape
    top_k = router_indices.shape[-1]
    expert_ids, perm = torch.sort(router_indices.reshape(-1))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    # histc has a fixed output size (bincount's depends on the data: a device sync); integer input only on CUDA
    counts = torch.histc(expert_ids.int() if expert_ids.is_cuda else expert_ids.float(), bins=self.num_experts,
                         min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    routed = _RouteRows.apply(hidden_states, perm, inverse, top_k)
    gate_up = _grouped_mm(routed, self.gate_up_proj, offsets)
    gate_up.add_(self.gate_up_proj_bias[expert_ids])
    out = _grouped_mm(_ClampedSwiGLU.apply(gate_up, self.alpha, self.limit), self.down_proj, offsets)
    out.add_(self.down_proj_bias[expert_ids])
    out = out * routing_weights.reshape(-1)[perm, None]
    out = _RouteRows.apply(out, inverse, perm, 1)
    return out.view(num_tokens, top_k, hidden_size).sum(1).to(hidden_states.dtype)

