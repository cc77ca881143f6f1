"""ReplayBuffer: eviction, staleness, reuse and selection by hand; Parquet round trip bit for bit."""

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.diffusion.trajectory import Trajectories
from orchestrator.replay import (
    ReplayBuffer,
    ReplayEntry,
    read_replay,
    staleness_stats,
    write_replay,
)


def entries(epoch, version, count, *, chunk_size=2):
    return [
        ReplayEntry(
            epoch=epoch,
            index=i,
            chunk=i // chunk_size,
            row=i % chunk_size,
            version=version,
            prompt=f"p{epoch}-{i}",
            reward=float(i),
            advantage=float(i) - 1.5,
        )
        for i in range(count)
    ]


def test_sync_defaults_train_exactly_the_fresh_batch_in_order_then_drop_it():
    buffer = ReplayBuffer(capacity=8, max_staleness=1, max_reuse=1)
    for epoch in (1, 2, 3):
        fresh = entries(epoch, epoch - 1, 4)
        buffer.add(fresh)
        buffer.evict(learner_version=epoch - 1)
        picked = buffer.select(4)
        assert [(e.epoch, e.index) for e in picked] == [(epoch, i) for i in range(4)]
        assert all(e.uses == 0 for e in picked)  # as they were when chosen
        gone = buffer.evict(learner_version=epoch - 1)
        assert len(gone) == 4 and len(buffer) == 0  # used max_reuse = 1 times


def test_staleness_eviction_by_age():
    # Learner at version 5, max_staleness 2: versions 3, 4, 5 stay (lag 2, 1, 0); 2 goes (lag 3).
    buffer = ReplayBuffer(capacity=100, max_staleness=2, max_reuse=10)
    for version in (2, 3, 4, 5):
        buffer.add(entries(version, version, 2))
    gone = buffer.evict(learner_version=5)
    assert sorted({e.version for e in gone}) == [2]
    assert sorted({e.version for e in buffer.entries}) == [3, 4, 5]


def test_capacity_evicts_the_oldest_versions_first():
    buffer = ReplayBuffer(capacity=5, max_staleness=10, max_reuse=10)
    buffer.add(entries(1, 1, 3))
    buffer.add(entries(2, 2, 3))
    gone = buffer.evict(learner_version=2)
    # 6 entries, room for 5: the first entry of version 1 leaves.
    assert [(e.epoch, e.index) for e in gone] == [(1, 0)]
    assert [(e.epoch, e.index) for e in buffer.entries] == [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


def test_reuse_counts_and_newest_first_selection():
    buffer = ReplayBuffer(capacity=10, max_staleness=3, max_reuse=2)
    buffer.add(entries(1, 0, 2))
    buffer.add(entries(2, 1, 2))
    buffer.add(entries(3, 1, 2))
    # Highest version first, then latest epoch; a batch keeps its order.
    picked = buffer.select(3)
    assert [(e.epoch, e.index) for e in picked] == [(3, 0), (3, 1), (2, 0)]
    assert [e.uses for e in buffer.entries] == [0, 0, 1, 0, 1, 1]
    picked = buffer.select(5)
    assert [(e.epoch, e.index) for e in picked] == [(3, 0), (3, 1), (2, 0), (2, 1), (1, 0)]
    gone = buffer.evict(learner_version=1)
    # Used twice = max_reuse: (3,0), (3,1), (2,0) leave.
    assert sorted((e.epoch, e.index) for e in gone) == [(2, 0), (3, 0), (3, 1)]
    assert [(e.epoch, e.index, e.uses) for e in buffer.entries] == [(1, 0, 1), (1, 1, 0), (2, 1, 1)]


def test_selection_while_filling_takes_whole_multiples():
    buffer = ReplayBuffer(capacity=16, max_staleness=1, max_reuse=2)
    buffer.add(entries(1, 0, 5))
    # 8 wanted, 5 held, learners split by 2: take 4, the newest.
    assert [(e.epoch, e.index) for e in buffer.select(8, multiple_of=2)] == [(1, i) for i in range(4)]
    with pytest.raises(ValueError, match="holds 5 trainable samples but an update needs a multiple of 8"):
        buffer.select(8, multiple_of=8)


def test_staleness_stats_by_hand():
    picked = entries(1, 3, 2) + entries(2, 5, 1)
    # Learner at version 5: lags 2, 2, 0 -> mean 4/3, max 2.
    stats = staleness_stats(picked, learner_version=5)
    assert stats["replay/staleness_mean"] == pytest.approx(4 / 3)
    assert stats["replay/staleness_max"] == 2.0


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="capacity must be an int >= 1, got 0"):
        ReplayBuffer(capacity=0, max_staleness=1, max_reuse=1)
    with pytest.raises(ValueError, match="max_reuse must be an int >= 1"):
        ReplayBuffer(capacity=4, max_staleness=1, max_reuse=0)


def fake_chunk(seed, rows, *, version):
    rng = np.random.default_rng(seed)
    trajectories = Trajectories(
        prompts=[f"prompt {seed}-{r}" for r in range(rows)],
        latents=rng.standard_normal((rows, 4, 2, 3, 3)).astype(np.float32),
        timesteps=np.array([900, 600, 300], dtype=np.int64),
        prev_timesteps=np.array([600, 300, -1], dtype=np.int64),
        log_probs=rng.standard_normal((rows, 3)).astype(np.float32),
        prompt_embeds=rng.standard_normal((rows, 5, 6)).astype(np.float32),
        negative_prompt_embeds=rng.standard_normal((5, 6)).astype(np.float32),
        seeds=rng.integers(0, 2**32, rows).astype(np.int64),
        guidance_scale=2.0,
        eta=1.0,
        num_inference_steps=3,
        policy_version=version,
    )
    return trajectories, rng.standard_normal((rows, 3, 2, 3, 3)).astype(np.float32)


@pytest.mark.parametrize("with_reference", [True, False])
def test_parquet_round_trip_is_exact(tmp_path, with_reference):
    chunks = {(1, 0): fake_chunk(1, 2, version=0), (1, 1): fake_chunk(2, 2, version=0), (2, 0): fake_chunk(3, 2, version=1)}
    if not with_reference:
        chunks = {k: (t, None) for k, (t, _) in chunks.items()}
    saved = [e for e in entries(1, 0, 4) if e.index != 1] + entries(2, 1, 2)
    saved[0] = ReplayEntry(**{**saved[0].__dict__, "uses": 1})
    assert write_replay(tmp_path / "replay.parquet", saved, chunks.__getitem__) == 5
    restored, rebuilt = read_replay(tmp_path / "replay.parquet")
    # Same records (rows renumbered into the rebuilt chunks), same order.
    assert [(e.epoch, e.index, e.chunk, e.version, e.uses, e.prompt, e.reward, e.advantage) for e in restored] == [
        (e.epoch, e.index, e.chunk, e.version, e.uses, e.prompt, e.reward, e.advantage) for e in saved
    ]
    for before, after in zip(saved, restored):
        original, ref = chunks[before.key]
        trajectories, ref_after = rebuilt[after.key]
        np.testing.assert_array_equal(trajectories.latents[after.row], original.latents[before.row])
        np.testing.assert_array_equal(trajectories.log_probs[after.row], original.log_probs[before.row])
        np.testing.assert_array_equal(trajectories.prompt_embeds[after.row], original.prompt_embeds[before.row])
        assert trajectories.seeds[after.row] == original.seeds[before.row]
        assert trajectories.latents.dtype == np.float32 and trajectories.seeds.dtype == np.int64
        np.testing.assert_array_equal(trajectories.negative_prompt_embeds, original.negative_prompt_embeds)
        np.testing.assert_array_equal(trajectories.timesteps, original.timesteps)
        assert (trajectories.guidance_scale, trajectories.eta, trajectories.policy_version) == (2.0, 1.0, original.policy_version)
        if with_reference:
            np.testing.assert_array_equal(ref_after[after.row], ref[before.row])
        else:
            assert ref_after is None
    # Entry (1, 1) was not saved, so chunk (1, 0) comes back with its one saved row.
    assert rebuilt[(1, 0)][0].batch_size == 1


def test_pooled_embeddings_round_trip_for_sdxl_and_sd3_chunks(tmp_path):
    # SDXL and SD3 condition on pooled embeddings too: a restored chunk without them could not be trained on.
    # This chunk is SD3-like: float32 sigmas for timesteps.
    trajectories, _ = fake_chunk(4, 3, version=2)
    rng = np.random.default_rng(4)
    trajectories.timesteps = np.array([1.0, 0.6, 0.3], dtype=np.float32)
    trajectories.prev_timesteps = np.array([0.6, 0.3, 0.0], dtype=np.float32)
    trajectories.pooled_prompt_embeds = rng.standard_normal((3, 7)).astype(np.float32)
    trajectories.negative_pooled_prompt_embeds = rng.standard_normal(7).astype(np.float32)
    saved = [e for e in entries(3, 2, 3, chunk_size=3) if e.index != 0]  # rows 1 and 2 of chunk 0
    assert write_replay(tmp_path / "replay.parquet", saved, lambda key: (trajectories, None)) == 2
    _, rebuilt = read_replay(tmp_path / "replay.parquet")
    restored = rebuilt[(3, 0)][0]
    np.testing.assert_array_equal(restored.pooled_prompt_embeds, trajectories.pooled_prompt_embeds[1:])
    np.testing.assert_array_equal(restored.negative_pooled_prompt_embeds, trajectories.negative_pooled_prompt_embeds)
    np.testing.assert_array_equal(restored.timesteps, trajectories.timesteps)
    assert restored.timesteps.dtype == np.float32 and restored.pooled_prompt_embeds.dtype == np.float32
    # a chunk without pooled embeddings (SD) comes back without them
    plain, _ = fake_chunk(5, 2, version=0)
    write_replay(tmp_path / "plain.parquet", entries(1, 0, 2), lambda key: (plain, None))
    plain_restored = read_replay(tmp_path / "plain.parquet")[1][(1, 0)][0]
    assert plain_restored.pooled_prompt_embeds is None and plain_restored.negative_pooled_prompt_embeds is None


def test_empty_buffer_round_trips(tmp_path):
    assert write_replay(tmp_path / "empty.parquet", [], lambda key: pytest.fail("nothing to fetch")) == 0
    assert read_replay(tmp_path / "empty.parquet") == ([], {})


def test_an_sde_window_chunk_keeps_its_first_step_and_older_files_read_as_every_step(tmp_path):
    # A flow policy's window [2, 5) of 8 steps: three recorded steps, the first of them step 2.
    trajectories, ref = fake_chunk(6, 2, version=0)
    trajectories = dataclasses.replace(trajectories, num_inference_steps=8, first_step=2)
    write_replay(tmp_path / "window.parquet", entries(1, 0, 2), lambda key: (trajectories, ref))
    restored = read_replay(tmp_path / "window.parquet")[1][(1, 0)][0]
    assert (restored.first_step, restored.num_inference_steps, restored.num_steps) == (2, 8, 3)
    # a file written before windows existed has no first_step column: it recorded every step
    table = pq.read_table(tmp_path / "window.parquet")
    pq.write_table(table.drop_columns(["first_step"]), tmp_path / "old.parquet")
    assert read_replay(tmp_path / "old.parquet")[1][(1, 0)][0].first_step == 0
