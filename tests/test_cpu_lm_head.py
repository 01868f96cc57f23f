"""The train step's CPU LM head computes what a plain log-softmax does: values and gradients."""
import pytest
import torch

from steps.modeling import _CpuLogProbs

pytestmark = pytest.mark.unit


def test_cpu_log_probs_match_log_softmax_values_and_gradients():
    torch.manual_seed(0)
    num_rows, hidden, vocab = 70, 16, 5000  # 70 rows: two full 32-row tiles and a partial one
    h = torch.randn(num_rows, hidden, dtype=torch.float32, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.float32, requires_grad=True)
    targets = torch.randint(0, vocab, (num_rows,))
    upstream = torch.randn(num_rows)

    logprobs, entropy, is_top1 = _CpuLogProbs.apply(h, w, targets, ("log_probs", "entropy", "is_top1"))
    (logprobs * upstream).sum().backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad, w.grad = None, None

    # The reference in float64, the head's inputs in float32.
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    log_p = torch.log_softmax(h64 @ w64.T, dim=-1)
    expected = log_p.gather(1, targets[:, None]).squeeze(1)
    (expected * upstream.double()).sum().backward()

    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logprobs.double(), expected.detach(), **close)
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(-1).detach(), **close)
    assert torch.equal(is_top1, (h64 @ w64.T).argmax(-1) == targets)
    torch.testing.assert_close(grads[0].double(), h64.grad, **close)
    torch.testing.assert_close(grads[1].double(), w64.grad, **close)
