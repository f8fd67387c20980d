"""The float64 simulations' own invariants (the GreedyLore one is held against real ranks elsewhere)."""
import torch

from lorecomm.simulate import SimulatedPowerSGD


def _low_rank(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)


def test_powersgd_recovers_a_gradient_within_its_rank():
    grads = [[_low_rank(20, 30, 3, 0) + 0.0], [_low_rank(20, 30, 3, 0) * 3.0]]  # mean = 2 x the matrix
    sim = SimulatedPowerSGD(2, [("w", (20, 30))], rank=4, min_compression_rate=1.0)
    out = sim.step(grads)[0]
    torch.testing.assert_close(out, 2.0 * _low_rank(20, 30, 3, 0), rtol=1e-10, atol=1e-10)


def test_powersgd_error_feedback_keeps_what_was_not_sent():
    sim = SimulatedPowerSGD(2, [("w", (16, 24))], rank=2, min_compression_rate=1.0)
    g = [[torch.randn(16, 24, dtype=torch.float64)] for _ in range(2)]
    out = sim.step(g)[0]
    for i in range(2):  # E_i = M_i - P Q^T with M_i = G_i at the first step
        torch.testing.assert_close(sim.E[i][0], g[i][0] - out)
    assert torch.linalg.matrix_rank(out) == 2


def test_powersgd_bytes_and_dense_leftovers_follow_torch_rule():
    # (m + n) * r * rate < m * n decides; 1-D tensors stay dense
    sim = SimulatedPowerSGD(2, [("w", (20, 30)), ("b", (20,)), ("s", (4, 4))], rank=2, min_compression_rate=1.0)
    ones = [torch.ones(20, 30, dtype=torch.float64), torch.ones(20, dtype=torch.float64),
            torch.ones(4, 4, dtype=torch.float64)]
    out = sim.step([ones, ones])
    assert sim.bytes_sent == 4 * (20 + 30) * 2 + 4 * 20 + 4 * 16
    torch.testing.assert_close(out[1], ones[1])
    torch.testing.assert_close(out[2], ones[2])


def test_a_step_with_nothing_compressed_counts_only_the_dense_bytes():
    # the runtime sends such a bucket dense, without the finite flag a compressed step carries
    # (Lore's dense steps after the warm-up go in its wire dtype, bf16)
    from lorecomm.simulate import SimulatedGreedyLore, SimulatedLore, SimulatedRandomLinear

    params = [("b", (20,)), ("s", (2, 3))]  # a bias, and a matrix too small to compress at rank 2
    sims = [(SimulatedRandomLinear(2, params, rank=2, error_feedback=True, skip_unused=True), 4),
            (SimulatedRandomLinear(2, params, rank=2), 4),
            (SimulatedGreedyLore(2, params, rank=2, update_interval=3, start_step=0, selection="fixed"), 4),
            (SimulatedGreedyLore(2, params, rank=2, update_interval=3, start_step=0, selection="random"), 4),
            (SimulatedLore(2, params, rank=2, start_step=0, skip_unused=True), 2),
            (SimulatedPowerSGD(2, params, rank=2), 4)]
    g = torch.Generator().manual_seed(0)
    for sim, per_element in sims:
        assert sim.compressed_params() == [], type(sim).__name__
        for _ in range(4):
            sim.step([[torch.randn(20, generator=g, dtype=torch.float64),
                       torch.randn(2, 3, generator=g, dtype=torch.float64)] for _ in range(2)])
        assert sim.bytes_sent == 4 * per_element * 26, (type(sim).__name__, sim.bytes_sent)
