"""Replay buffers: the batched reservoir insertion against a sample-by-sample reference, its
inclusion statistics, the class-balanced reservoir on hand-worked streams, and the state format."""

from __future__ import annotations

import math

import pytest
import torch

from cl_plugins.buffers import STATE_VERSION, ClassBalancedBuffer, ReservoirBuffer, make_buffer

HIGH = 2**62  # the range of the buffer's integer draws


def _offer(buf: ReservoirBuffer, ids: range, batch: int) -> None:
    """Offers samples ``ids`` (x = y = the id) in batches of ``batch``."""
    ids = list(ids)
    for i in range(0, len(ids), batch):
        chunk = torch.tensor(ids[i:i + batch])
        buf.add(chunk.float().unsqueeze(1), chunk, torch.zeros_like(chunk))


def _sequential_reference(capacity: int, n: int, seed: int, batch: int) -> list[int]:
    """Algorithm R one sample at a time, fed with the draws the buffer makes for each batch: the
    sample numbered k (1-based) takes slot ``draw % k`` when it is below the capacity."""
    g = torch.Generator().manual_seed(seed)
    slots = [-1] * capacity
    for start in range(0, n, batch):
        ids = list(range(start, min(start + batch, n)))
        fill = max(0, min(len(ids), capacity - start))
        draws = torch.randint(0, HIGH, (len(ids) - fill,), generator=g).tolist() if fill < len(ids) else []
        for j, sample in enumerate(ids):
            if j < fill:
                slots[sample] = sample
                continue
            slot = draws[j - fill] % (sample + 1)
            if slot < capacity:
                slots[slot] = sample  # later samples overwrite earlier ones, in order
    return slots


@pytest.mark.parametrize("batch", [1, 7, 10, 50])  # 50: several samples of one batch draw the same slot
def test_batched_insertion_equals_algorithm_r_sample_by_sample(batch):
    capacity, n = 5, 300
    buf = ReservoirBuffer(capacity, seed=3)
    _offer(buf, range(n), batch)
    assert buf.num_seen == n and len(buf) == capacity
    assert buf.data["y"].tolist() == _sequential_reference(capacity, n, 3, batch)
    assert torch.equal(buf.data["x"].squeeze(1).long(), buf.data["y"])  # every field follows its sample


def test_batching_does_not_change_the_buffer():
    """One draw per sample beyond the capacity, in stream order: the content does not depend on how
    the stream is cut into batches."""
    contents = set()
    for batch in (1, 3, 10, 64, 500):
        buf = ReservoirBuffer(20, seed=11)
        _offer(buf, range(500), batch)
        contents.add(tuple(buf.data["y"].tolist()))
    assert len(contents) == 1


def test_every_sample_is_kept_with_probability_capacity_over_n():
    n, capacity, trials, batch = 60, 12, 3000, 10
    counts = torch.zeros(n)
    for seed in range(trials):
        buf = ReservoirBuffer(capacity, seed=seed)
        _offer(buf, range(n), batch)
        counts[buf.data["y"]] += 1
    p = capacity / n
    std = math.sqrt(p * (1 - p) / trials)  # binomial std of each sample's frequency (0.0073)
    freq = counts / trials
    assert (freq - p).abs().max() < 4.5 * std, freq  # 60 samples: a 4.5-sigma miss has probability ~4e-4
    # early and late samples alike (a slot drawn in [0, capacity) instead of [0, k) keeps the last ones)
    assert abs(freq[:20].mean() - freq[-20:].mean()) < 4.5 * std * math.sqrt(2 / 20)


def test_fields_logits_and_errors():
    buf = ReservoirBuffer(4, seed=0, store_logits=True)
    assert buf.add(torch.ones(3, 2), torch.tensor([1, 2, 3]), torch.zeros(3), logits=torch.randn(3, 5)) == 3
    with pytest.raises(ValueError, match="number of outputs changed during the stream"):
        buf.add(torch.ones(1, 2), torch.tensor([4]), torch.zeros(1), logits=torch.randn(1, 6))
    with pytest.raises(ValueError, match="pass logits"):
        buf.add(torch.ones(1, 2), torch.tensor([4]), torch.zeros(1))
    with pytest.raises(ValueError, match="2 labels but 3 rows of 'x'"):
        buf.add(torch.ones(3, 2), torch.tensor([4, 5]), torch.zeros(2), logits=torch.randn(2, 5))
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ReservoirBuffer(0)
    with pytest.raises(ValueError, match="'reservoir' or 'class_balanced'"):
        make_buffer("fifo", 4)  # type: ignore[arg-type]


def test_state_round_trip_version_and_kind():
    buf = ReservoirBuffer(8, seed=0)
    _offer(buf, range(30), 4)
    state = buf.state_dict()
    assert state["kind"] == "reservoir" and state["version"] == STATE_VERSION
    clone = ReservoirBuffer(8, seed=99)
    clone.load_state_dict(state)
    _offer(buf, range(30, 60), 4)
    _offer(clone, range(30, 60), 4)
    assert torch.equal(buf.data["y"], clone.data["y"])
    old = {k: v for k, v in state.items() if k not in ("kind", "version")}  # a state of the first format
    ReservoirBuffer(8).load_state_dict(old)
    with pytest.raises(ValueError, match="'reservoir' buffer, this one is 'class_balanced'"):
        ClassBalancedBuffer(8).load_state_dict(state)
    with pytest.raises(ValueError, match="state version 99"):
        ReservoirBuffer(8).load_state_dict({**state, "version": 99})


# ---------------------------------------------------------------------- class-balanced reservoir
def _offer_labels(buf: ReservoirBuffer, labels: list[int], start_id: int = 0) -> None:
    """Offers one sample per label; its x is a unique id (``start_id`` on)."""
    y = torch.tensor(labels)
    ids = torch.arange(start_id, start_id + len(labels)).float().unsqueeze(1)
    buf.add(ids, y, torch.zeros_like(y))


def _counts(buf: ClassBalancedBuffer) -> dict[int, int]:
    labels = buf.data["y"][: len(buf)].tolist()
    return {c: labels.count(c) for c in sorted(set(labels))}


@pytest.mark.parametrize("seed", range(5))
def test_class_balanced_hand_worked_stream(seed):
    buf = ClassBalancedBuffer(4, seed=seed)
    _offer_labels(buf, [0, 0, 0, 0])  # fills
    assert _counts(buf) == {0: 4} and buf.marked_full == set()
    _offer_labels(buf, [1], 4)  # class 1 is not full: replaces a sample of the largest class (0)
    assert _counts(buf) == {0: 3, 1: 1} and buf.marked_full == {0}
    _offer_labels(buf, [1], 5)
    assert _counts(buf) == {0: 2, 1: 2}
    # class 1 is now one of the largest, hence full: a within-class reservoir (kept with p = 2/3)
    before = buf.data["x"][:, 0].tolist()
    _offer_labels(buf, [1], 6)
    assert _counts(buf) == {0: 2, 1: 2}
    after = buf.data["x"][:, 0].tolist()
    changed = [i for i in range(4) if before[i] != after[i]]
    assert all(buf.data["y"][i] == 1 and after[i] == 6 for i in changed) and len(changed) <= 1
    # class 2 is new: replaces a sample of one of the two largest classes (0 or 1, at random)
    _offer_labels(buf, [2], 7)
    counts = _counts(buf)
    assert counts[2] == 1 and sorted([counts.get(0, 0), counts.get(1, 0)]) == [1, 2]
    # class 0 was largest before: full for ever, so its samples only replace class-0 samples
    kept = _counts(buf)
    _offer_labels(buf, [0] * 6, 8)
    assert _counts(buf) == kept
    assert buf.seen_per_class == {0: 10, 1: 3, 2: 1} and buf.num_seen == 14


def test_class_balanced_breaks_ties_between_largest_classes_at_random():
    victims = set()
    for seed in range(20):
        buf = ClassBalancedBuffer(4, seed=seed)
        _offer_labels(buf, [0, 0, 1, 1, 2])  # 0 and 1 tie as the largest: either loses a sample
        counts = _counts(buf)
        victims.add(0 if counts[0] == 1 else 1)
        assert sorted(counts.values()) == [1, 1, 2] and counts[2] == 1
    assert victims == {0, 1}


def test_class_balanced_evens_out_an_imbalanced_stream_where_reservoir_does_not():
    labels = [0] * 90 + [1] * 10
    balanced, reservoir = ClassBalancedBuffer(20, seed=0), ReservoirBuffer(20, seed=0)
    _offer_labels(balanced, labels)
    _offer_labels(reservoir, labels)
    # each class-1 sample replaces a class-0 one until the two tie at 10
    assert _counts(balanced) == {0: 10, 1: 10}
    assert _counts(reservoir).get(1, 0) < 10


def test_class_balanced_within_class_reservoir_is_uniform():
    """Class 0 fills the buffer, two class-1 samples take two of its slots, then ten more class-0
    samples: each of the 14 class-0 samples ends in the buffer with probability 2 / 14."""
    trials = 3000
    counts = torch.zeros(14)
    for seed in range(trials):
        buf = ClassBalancedBuffer(4, seed=seed)
        _offer_labels(buf, [0, 0, 0, 0, 1, 1] + [0] * 10)
        assert _counts(buf) == {0: 2, 1: 2}
        ids = buf.data["x"][:, 0].long()
        zeros = ids[buf.data["y"] == 0]
        counts[torch.where(zeros < 4, zeros, zeros - 2)] += 1  # ids 0-3 and 6-15 are the class-0 samples
    p = 2 / 14
    std = math.sqrt(p * (1 - p) / trials)
    assert ((counts / trials) - p).abs().max() < 4.5 * std, counts / trials


def test_class_balanced_resumes_exactly_and_draws_in_batches_as_one_by_one():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (300,), generator=g).tolist()
    whole = ClassBalancedBuffer(30, seed=4)
    _offer_labels(whole, labels)
    stopped = ClassBalancedBuffer(30, seed=4)
    for i in range(0, 150, 10):
        _offer_labels(stopped, labels[i:i + 10], i)
    resumed = ClassBalancedBuffer(30, seed=123)
    resumed.load_state_dict(stopped.state_dict())
    for i in range(150, 300, 10):
        _offer_labels(resumed, labels[i:i + 10], i)
    assert torch.equal(resumed.data["x"], whole.data["x"]) and resumed.seen_per_class == whole.seen_per_class
    assert resumed.marked_full == whole.marked_full
    counts = list(_counts(whole).values())
    assert max(counts) - min(counts) <= 1  # five classes of about 60 samples each: equal shares of 30
    with pytest.raises(ValueError, match="labels >= 0"):
        _offer_labels(ClassBalancedBuffer(3), [-1])
