import pytest
import torch

from emoe.spec import ACT_SWIGLU_CLAMPED, SILU_GLU, ExpertActivation
from experts import expert_ffn_grouped, expert_ffn_reference
from experts.ffn import get_activation

SWIGLU = ExpertActivation(ACT_SWIGLU_CLAMPED, alpha=1.702, limit=0.8)  # a limit the inputs here exceed


@pytest.mark.parametrize(
    "n, k, num_experts, hidden, inter, dtype, tol, act, bias",
    [
        (1, 1, 1, 16, 8, torch.float32, 1e-6, SILU_GLU, False),
        (7, 2, 4, 32, 24, torch.float32, 1e-6, SILU_GLU, False),
        (64, 8, 16, 64, 32, torch.float32, 1e-5, SILU_GLU, False),
        (33, 4, 8, 64, 32, torch.bfloat16, 3e-2, SILU_GLU, False),
        (7, 2, 4, 32, 24, torch.float32, 1e-6, SWIGLU, True),  # gpt-oss: clamped SwiGLU + biases
        (64, 4, 8, 64, 32, torch.float32, 1e-5, SWIGLU, True),
        (33, 4, 8, 64, 32, torch.bfloat16, 3e-2, SWIGLU, True),
    ],
)
def test_grouped_equals_dense_reference(n, k, num_experts, hidden, inter, dtype, tol, act, bias):
    g = torch.Generator().manual_seed(n * 31 + k)
    x = torch.randn(n, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(n)])
    ids[torch.rand(n, k, generator=g) < 0.2] = -1  # pairs served by another group
    w = torch.rand(n, k, generator=g)
    w_gu = torch.randn(num_experts, 2 * inter, hidden, generator=g).to(dtype) / hidden**0.5
    w_d = torch.randn(num_experts, hidden, inter, generator=g).to(dtype) / inter**0.5
    b_gu = (0.5 * torch.randn(num_experts, 2 * inter, generator=g)).to(dtype) if bias else None
    b_d = (0.5 * torch.randn(num_experts, hidden, generator=g)).to(dtype) if bias else None
    fn = get_activation(act)
    got = expert_ffn_grouped(x, ids, w, w_gu, w_d, b_gate_up=b_gu, b_down=b_d, act=fn)
    want = expert_ffn_reference(
        x.float(), ids, w, w_gu.float(), w_d.float(), b_gate_up=_f32(b_gu), b_down=_f32(b_d), act=fn
    )
    assert got.shape == (n, hidden) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None else None


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="choices: silu, swiglu_clamped"):
        get_activation(ExpertActivation("gelu"))


def test_all_pairs_elsewhere_gives_zero():
    x = torch.randn(3, 8)
    ids = torch.full((3, 2), -1)
    out = expert_ffn_grouped(x, ids, torch.ones(3, 2), torch.randn(2, 8, 8), torch.randn(2, 8, 4))
    assert torch.equal(out, torch.zeros_like(x))
