import pytest
import torch

from experts import expert_ffn_grouped, expert_ffn_reference


@pytest.mark.parametrize(
    "n, k, num_experts, hidden, inter, dtype, tol",
    [
        (1, 1, 1, 16, 8, torch.float32, 1e-6),
        (7, 2, 4, 32, 24, torch.float32, 1e-6),
        (64, 8, 16, 64, 32, torch.float32, 1e-5),
        (33, 4, 8, 64, 32, torch.bfloat16, 3e-2),
    ],
)
def test_grouped_equals_dense_reference(n, k, num_experts, hidden, inter, dtype, tol):
    g = torch.Generator().manual_seed(n * 31 + k)
    x = torch.randn(n, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(n)])
    ids[torch.rand(n, k, generator=g) < 0.2] = -1  # pairs served by another group
    w = torch.rand(n, k, generator=g)
    w_gu = torch.randn(num_experts, 2 * inter, hidden, generator=g).to(dtype) / hidden**0.5
    w_d = torch.randn(num_experts, hidden, inter, generator=g).to(dtype) / inter**0.5
    got = expert_ffn_grouped(x, ids, w, w_gu, w_d)
    want = expert_ffn_reference(x.float(), ids, w, w_gu.float(), w_d.float())
    assert got.shape == (n, hidden) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_all_pairs_elsewhere_gives_zero():
    x = torch.randn(3, 8)
    ids = torch.full((3, 2), -1)
    out = expert_ffn_grouped(x, ids, torch.ones(3, 2), torch.randn(2, 8, 8), torch.randn(2, 8, 4))
    assert torch.equal(out, torch.zeros_like(x))
