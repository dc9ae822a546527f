"""N:M layers keep no effective weight from forward to backward (surgeon.masking.recompute), and their outputs and
gradients are bit for bit those of the plain autograd computation of W ⊙ S(W) with a straight-through backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_nm_ranks import reference_nm_mask
from torch import nn
from torch.utils.checkpoint import checkpoint

import surgeon
from surgeon.errors import SurgeonError
from surgeon.masking.surgery import sites
from surgeon.sparsity.scratch import recycled


@pytest.fixture(autouse=True)
def recompute_every_layer(monkeypatch):
    """These layers are small; every one of them takes the recompute path here."""
    from surgeon.masking import recompute

    monkeypatch.setattr(recompute, "RECOMPUTED_FROM", 0)


class _ReferenceSTE(torch.autograd.Function):
    """W ⊙ keep forward, saved by autograd as usual; gradient straight through plus λ_W·W where pruned."""

    @staticmethod
    def forward(ctx, w, keep, lambda_w):
        ctx.save_for_backward(w, keep)
        ctx.lambda_w = lambda_w
        return w * keep

    @staticmethod
    def backward(ctx, grad):
        w, keep = ctx.saved_tensors
        return (grad + ctx.lambda_w * w * ~keep if ctx.lambda_w > 0 else grad), None, None


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.attn = nn.Linear(8, 16)  # on [batch, tokens, features]: matmul saves a view of the weight
        self.out = nn.Linear(16 * 16, 4)

    def forward(self, x):
        h = F.silu(self.conv(x))
        h = self.attn(h.flatten(2).transpose(1, 2))
        return self.out(h.flatten(1))


def _net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    return _Net()


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(-3, 4, (2, 8, 4, 4), generator=g).float()  # integers: ties in W's products don't matter


def _reference(net: _Net, x: torch.Tensor, lambda_w: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = {k: v.detach().clone().requires_grad_() for k, v in net.state_dict().items()}

    def weight(name):
        w = params[f"{name}.weight"]
        return _ReferenceSTE.apply(w, reference_nm_mask(w, 2, 4), lambda_w)

    h = F.silu(F.conv2d(x, weight("conv"), params["conv.bias"], padding=1))
    h = F.linear(h.flatten(2).transpose(1, 2), weight("attn"), params["attn.bias"])
    y = F.linear(h.flatten(1), weight("out"), params["out.bias"])
    y.square().sum().backward()
    return y, {k: v.grad for k, v in params.items()}


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in net.named_parameters():
        out[name.replace("parametrizations.weight.original", "weight")] = p.grad
    return out


def _nm(net: nn.Module, lambda_w: float = 0.0) -> nn.Module:
    return surgeon.inject(net, surgeon.plan(net, nm="2:4"), lambda_w=lambda_w)


@pytest.mark.parametrize("lambda_w", [0.0, 0.25])
def test_output_and_gradients_equal_the_reference(lambda_w):
    x = _inputs().requires_grad_()
    expected_y, expected = _reference(_net(), x.detach().requires_grad_(), lambda_w)
    net = _nm(_net(), lambda_w)
    y = net(x)
    y.square().sum().backward()
    assert torch.equal(y, expected_y)
    got = _grads(net)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def _saved(fn) -> list[torch.Tensor]:
    """Every tensor that reaches an outer saved-tensors hook during ``fn()`` (forward and backward)."""
    seen: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        fn()
    return seen


def _saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the storages saved for backward during one step, the parameters' own excluded."""
    originals = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _saved(lambda: net(x).sum().backward())
    }
    return sum(size for ptr, size in storages.items() if ptr not in originals)


def test_the_effective_weight_is_not_saved():
    x = _inputs().requires_grad_()
    net = _nm(_net())
    effective = [s.effective().detach() for s in sites(net).values()]
    seen = _saved(lambda: net(x).square().sum().backward())
    for t in seen:  # nothing saved holds S(W) (W itself, saved by SR-STE, is a parameter)
        assert not any(t.numel() == e.numel() and torch.equal(t.reshape(-1), e.reshape(-1)) for e in effective)
    # without the hooks inject registers (a plain parametrization), every effective weight is saved
    plain = _nm(_net())
    for module in plain.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
        module._forward_hooks_always_called.clear()
    weight_bytes = sum(e.numel() * e.element_size() for e in effective)
    assert _saved_bytes(plain, x) - _saved_bytes(net, x) >= weight_bytes


def test_gradients_equal_under_checkpointing_and_outer_hooks():
    x = _inputs().requires_grad_()
    _, expected = _reference(_net(), x.detach().requires_grad_(), 0.1)
    for run in ("checkpoint", "reentrant", "outer hooks"):
        net = _nm(_net(), 0.1)
        if run == "outer hooks":
            _saved(lambda: net(x).square().sum().backward())  # noqa: B023 - called at once
        else:
            y = checkpoint(net, x, use_reentrant=run == "reentrant")
            y.square().sum().backward()
        got = _grads(net)
        for name in expected:
            assert torch.equal(got[name], expected[name]), (run, name)


def test_no_hooks_left_installed_after_no_grad_eval_and_a_failing_forward():
    net = _nm(_net())
    with torch.no_grad():
        net.eval()(_inputs())
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    with pytest.raises(RuntimeError):
        net.train()(torch.zeros(2, 3, 4, 4))  # wrong channel count: the conv raises inside the hooked forward
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_changing_the_weight_between_forward_and_backward_fails_loudly():
    net = _nm(_net())
    y = net(_inputs().requires_grad_())
    with torch.no_grad():
        sites(net)["conv.weight"].original.mul_(2)
    with pytest.raises(SurgeonError, match="modified in place"):
        y.sum().backward()


def test_fold_remove_and_deepcopy():
    net = _nm(_net())
    twin = copy.deepcopy(net)
    x = _inputs().requires_grad_()
    twin(x).sum().backward()  # the copy's hooks work on the copy's weights
    assert all(s.original.grad is not None for s in sites(twin).values())
    surgeon.fold(net)
    for module in net.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    net(x).sum().backward()


def test_a_recycled_block_is_never_handed_out_while_referenced():
    first = recycled("test.block", (4, 8), torch.float32, torch.device("cpu")).fill_(1.0)
    view = first.t()
    del first
    second = recycled("test.block", (4, 8), torch.float32, torch.device("cpu")).fill_(2.0)
    assert bool((view == 1.0).all())  # the view still holds the first block
    address = second.data_ptr()
    del second
    assert recycled("test.block", (2, 8), torch.float32, torch.device("cpu")).data_ptr() == address


def test_a_small_layer_keeps_its_effective_weight_and_a_large_one_does_not(monkeypatch):
    from surgeon.masking import recompute

    x = _inputs().requires_grad_()
    net = _nm(_net())
    sizes = sorted(s.original.numel() for s in sites(net).values())
    monkeypatch.setattr(recompute, "RECOMPUTED_FROM", sizes[-1])  # only the largest layer is recomputed
    effective = {s.original.numel(): s.effective().detach() for s in sites(net).values()}
    seen = _saved(lambda: net(x).square().sum().backward())

    def saved(e: torch.Tensor) -> bool:  # as it is, or the transposed view a linear saves
        flat = e.reshape(-1)
        return any(
            t.numel() == e.numel()
            and (torch.equal(t.reshape(-1), flat) or (t.dim() == 2 and torch.equal(t.t().reshape(-1), flat)))
            for t in seen
        )

    assert not saved(effective[sizes[-1]])
    assert all(saved(effective[n]) for n in sizes[:-1])
