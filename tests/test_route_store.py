"""The worker's step -> request bookkeeping, against a simulated scheduler."""

from __future__ import annotations

import numpy as np

from pr2_serve.plugin.route_store import RouteStore

L, K, BS = 3, 2, 4


def route_of(req: int, pos: int) -> np.ndarray:
    """A distinct, deterministic route for (request, position)."""
    base = (req * 7 + pos * 3) % 250
    return np.array([[base + layer, base + layer + 1] for layer in range(L)], np.uint8)


class Sim:
    """Minimal paged-KV scheduler: requests own blocks; steps compute runs of positions."""

    def __init__(self):
        self.store = RouteStore(64, L, K, np.uint8, block_size=BS)
        self.blocks: dict[int, list[int]] = {}
        self.next_block = 0

    def alloc(self, req, upto):
        row = self.blocks.setdefault(req, [])
        while len(row) * BS < upto:
            row.append(self.next_block)
            self.next_block += 1

    def step(self, work: list[tuple[int, int, int]]):
        """work: (request, first position, count)."""
        rows, slots, positions, bounds = [], [], [], [0]
        for req, p0, m in work:
            self.alloc(req, p0 + m)
            for p in range(p0, p0 + m):
                rows.append(route_of(req, p))
                slots.append(self.blocks[req][p // BS] * BS + p % BS)
                positions.append(p)
            bounds.append(len(rows))
        self.store.on_step(
            np.array(rows),
            np.array(slots),
            np.array(positions),
            [f"r{req}" for req, _, _ in work],
            np.array(bounds),
            lambda j: np.array(self.blocks[work[j][0]]),
        )


def expected(req, n):
    return np.stack([route_of(req, p) for p in range(n)])


def test_chunked_prefill_and_decode_interleaved():
    sim = Sim()
    sim.step([(0, 0, 5), (1, 0, 3)])
    sim.step([(0, 5, 4), (1, 3, 1)])
    sim.step([(0, 9, 1), (1, 4, 1)])
    np.testing.assert_array_equal(sim.store.take("r0"), expected(0, 10))
    np.testing.assert_array_equal(sim.store.take("r1", num_rows=4), expected(1, 4))
    assert len(sim.store) == 0


def test_prefix_cache_hit_reads_slots_of_shared_blocks():
    sim = Sim()
    sim.step([(0, 0, 8)])
    # request 2 shares request 0's first two blocks (8 cached tokens with the same routes)
    sim.blocks[2] = list(sim.blocks[0][:2])
    sim.step([(2, 8, 3)])
    got = sim.store.take("r2")
    np.testing.assert_array_equal(got[:8], expected(0, 8))
    np.testing.assert_array_equal(got[8:], np.stack([route_of(2, p) for p in range(8, 11)]))
    assert sim.store.stats["prefix_cache_rows"] == 8


def test_preemption_recompute_keeps_original_rows():
    sim = Sim()
    sim.step([(0, 0, 6)])
    sim.blocks.pop(0)  # preempted: blocks freed; recompute from 0 into new blocks
    sim.step([(0, 0, 7)])
    got = sim.store.take("r0")
    np.testing.assert_array_equal(got, expected(0, 7))
    assert sim.store.stats["recomputed_rows"] == 6


def test_untracked_requests_and_eviction():
    store = RouteStore(16, L, K, np.uint8, block_size=BS, unclaimed_ttl_s=0.0)
    store.on_step(
        np.stack([route_of(0, 0), route_of(0, 0)]),
        np.array([0, 1]),
        np.array([0, 0]),
        [None, "a"],
        np.array([0, 1, 2]),
        lambda j: None,
    )
    assert len(store) == 1
    store.on_finished(["a"])
    store.on_finished([])  # the next finish evicts unclaimed rows past their TTL
    assert store.take("a") is None
