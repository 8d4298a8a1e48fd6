"""The monitor's chunk size: about 10 ms of the slowest measured connection (collcomm.faults.chunks)."""

from hypothesis import given
from hypothesis import strategies as st

from collcomm.faults.chunks import CHUNK_SECONDS, MIN_CHUNK_BYTES, ChunkSizer, chunk_for_rates

KB, MB = 1 << 10, 1 << 20
rates = st.lists(st.one_of(st.none(), st.floats(1e3, 1e11)), max_size=8)
sizes = st.sampled_from([1 << k for k in range(12, 24)])


def test_slow_links_get_small_chunks_and_loopback_keeps_the_ceiling():
    assert chunk_for_rates([6.25e6, 50e6, 50e6], MB, MB) == 64 * KB  # the emulated two-box NICs
    assert chunk_for_rates([50e6], MB, MB) == 256 * KB  # 500 KB in 10 ms, rounded down
    assert chunk_for_rates([2e9, 3e9], MB, MB) == MB  # loopback: the ceiling
    assert chunk_for_rates([6e5], MB, MB) == MIN_CHUNK_BYTES  # a throttled link: the floor
    assert chunk_for_rates([6e5], MB, 16 * KB) == 16 * KB  # a ceiling under the floor wins
    assert chunk_for_rates([None], 256 * KB, MB) == 256 * KB and chunk_for_rates([], MB, MB) == MB
    assert chunk_for_rates([2e9], 64 * KB, MB) == MB  # the slow link is gone: back up


def test_noise_within_a_factor_of_two_changes_nothing():
    assert chunk_for_rates([10e6], 64 * KB, MB) == 64 * KB  # 100 KB of ideal, 64 KB kept
    assert chunk_for_rates([4e6], 64 * KB, MB) == 64 * KB
    assert chunk_for_rates([14e6], 64 * KB, MB) == 128 * KB  # 140 KB: more than twice


def test_small_frame_rates_only_ever_grow_chunks():
    # A job of small operations on loopback: round trips make its connections look slow.
    assert chunk_for_rates([], MB, MB, lower_bounds=[5e6]) == MB
    assert chunk_for_rates([2e9], MB, MB, lower_bounds=[5e6]) == MB
    # They do show that chunks can grow (64 KB chunks are all small frames).
    assert chunk_for_rates([], 64 * KB, MB, lower_bounds=[1e9, 2e9]) == MB
    assert chunk_for_rates([], 64 * KB, MB, lower_bounds=[6e6, 1e9]) == 64 * KB
    # A timed slow connection still shrinks them, whatever the small frames say.
    assert chunk_for_rates([6e6], MB, MB, lower_bounds=[1e9]) == 64 * KB


@given(rates, rates, sizes, sizes)
def test_the_size_is_a_power_of_two_in_range_or_unchanged(timed, bounds, current, ceiling):
    out = chunk_for_rates(timed, current, ceiling, bounds)
    got = [r for r in timed + bounds if r is not None]
    if out == current:
        return
    assert got, "no rate, yet the size changed"
    assert min(MIN_CHUNK_BYTES, ceiling) <= out <= ceiling and out & (out - 1) == 0
    ideal = min(got) * CHUNK_SECONDS
    # The largest power of two not above the ideal, unless a bound stops it there.
    assert out <= max(ideal, min(MIN_CHUNK_BYTES, ceiling)) and (out == ceiling or 2 * out > ideal)
    assert not (current // 2 <= ideal <= 2 * current and min(MIN_CHUNK_BYTES, ceiling) <= current <= ceiling)
    if out < current:
        timed_min = min((r for r in timed if r is not None), default=None)
        assert timed_min is not None and timed_min * CHUNK_SECONDS == ideal, "shrunk on a lower bound"


def test_the_sizer_changes_only_after_two_rounds_agree():
    s = ChunkSizer(MB)
    assert s.observe([6e6]) == MB  # one round: a descheduled receiver looks like this too
    assert s.observe([2e9]) == MB
    assert s.observe([6e6]) == MB
    assert s.observe([6e6]) == 64 * KB
    assert s.observe([]) == 64 * KB  # nothing measured: no change
    assert s.observe([], [2e9]) == 64 * KB and s.observe([], [2e9]) == MB
