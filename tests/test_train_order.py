"""The training order (selfalign_ray/train/order.py): one seeded permutation of every row of every file, split
between the workers after shuffling, the same on every run, whether Ray Data's sort or the driver made it.
Ray Data only, no model."""

from __future__ import annotations

import threading

import pytest

from selfalign_ray.config import ConfigError

ITERATIONS, ROWS_PER_FILE = 3, 8
COLUMNS = ["prompt", "chosen", "rejected"]


@pytest.fixture(scope="module")
def synpo_like_files(tmp_path_factory):
    """SynPO's cumulative layout: iter_1/added ... iter_3/added, 8 pairs each; the prompt names its origin."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("synpo_like")
    files = []
    for it in range(1, ITERATIONS + 1):
        rows = [{"prompt": [{"role": "user", "content": f"iter {it} row {i}"}],
                 "chosen": [{"role": "assistant", "content": f"good {it}.{i}"}],
                 "rejected": [{"role": "assistant", "content": f"bad {it}.{i}"}],
                 "score": float(i)} for i in range(ROWS_PER_FILE)]
        (root / f"iter_{it}").mkdir()
        path = root / f"iter_{it}" / "added.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        files.append(str(path))
    return files


def _name(row) -> str:
    return row["prompt"][0]["content"]


def _all_rows(files) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for f in files for r in pq.read_table(f, columns=COLUMNS).to_pylist()]


def _ordered(ray, files, seed, rows_per_block=4, read_blocks=None):
    from selfalign_ray.train.order import global_order

    kw = {"override_num_blocks": read_blocks} if read_blocks else {}
    return global_order(ray.data.read_parquet(files, **kw).select_columns(COLUMNS), seed, rows_per_block)


def _driver(files, seed, rows_per_block=4):
    from selfalign_ray.train.order import driver_order

    return driver_order(None, files, COLUMNS, seed, rows_per_block)


def _read(ds) -> list[str]:
    from ray.data import ExecutionOptions

    ds.context.execution_options = ExecutionOptions(preserve_order=True)
    return [_name(r) for r in ds.iter_rows()]


def _split(ds, world) -> list[list[str]]:
    """What each Ray Train rank reads: Ray Train's own DataConfig with the trainer's options, ranks in threads."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    shards = DataConfig(execution_options=ExecutionOptions(preserve_order=True)).configure(
        {"train": ds}, world_size=world, worker_handles=None, worker_node_ids=None)
    got: list[list[str]] = [[] for _ in range(world)]

    def consume(rank):
        for batch in shards[rank]["train"].iter_batches(batch_size=1, batch_format="pyarrow"):
            got[rank] += [_name(r) for r in batch.to_pylist()]

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank's split never finished"
    return got


@pytest.mark.timeout(300)
def test_order_is_a_seeded_permutation_of_every_file_independent_of_the_read_layout(ray_local, synpo_like_files):
    from selfalign_ray.train.order import order_key

    rows = _all_rows(synpo_like_files)
    names = [_name(r) for r in rows]
    order = _read(_ordered(ray_local, synpo_like_files, seed=0))
    # A permutation: no row lost or duplicated.
    assert sorted(order) == sorted(names) and len(order) == ITERATIONS * ROWS_PER_FILE
    # It is the keyed-hash order, a function of (seed, rows) only: the same whatever Ray's read layout.
    expected = [names[i] for i in sorted(range(len(rows)), key=lambda i: order_key(rows[i], 0))]
    assert order == expected
    assert _read(_ordered(ray_local, synpo_like_files, seed=0, read_blocks=1)) == expected
    # The driver's sort (small training sets) gives the same permutation.
    assert _read(_driver(synpo_like_files, seed=0)) == expected
    # It mixes the iterations: the first optimizer step (8 rows) is not iteration 1's file in file order.
    first = order[:ROWS_PER_FILE]
    assert {n.split()[1] for n in first} != {"1"}
    assert order != names
    # A different seed gives a different permutation.
    other = _read(_driver(synpo_like_files, seed=1))
    assert sorted(other) == sorted(names) and other != order


@pytest.mark.timeout(300)
def test_equal_split_deals_the_permutation_round_robin_and_repeats_on_resume(ray_local, synpo_like_files):
    from selfalign_ray.train.order import order_key

    rows = _all_rows(synpo_like_files)
    order = [_name(rows[i]) for i in sorted(range(len(rows)), key=lambda i: order_key(rows[i], 7))]
    # 2 ranks, 4 rows per rank per optimizer step (global batch 8): rank r takes blocks r, r + 2, ...
    first = _split(_ordered(ray_local, synpo_like_files, seed=7, rows_per_block=4), world=2)
    assert first[0] == order[0:4] + order[8:12] + order[16:20]
    assert first[1] == order[4:8] + order[12:16] + order[20:24]
    # A restarted run (a fresh plan, another read layout) hands every rank exactly the same rows in the same order.
    again = _split(_ordered(ray_local, synpo_like_files, seed=7, rows_per_block=4, read_blocks=5), world=2)
    assert again == first
    # So do the driver's blocks (the path of a small training set).
    assert _split(_driver(synpo_like_files, seed=7, rows_per_block=4), world=2) == first


def test_small_sets_are_sorted_on_the_driver_large_ones_by_ray_data(ray_local, synpo_like_files):
    import pyarrow.parquet as pq

    from selfalign_ray.train.order import _selected_bytes, ordered_dataset

    used = _selected_bytes(None, synpo_like_files, COLUMNS)
    everything = sum(pq.read_metadata(f).row_group(0).total_byte_size for f in synpo_like_files)
    assert 0 < used < everything  # the footers' sizes of the used columns only ("score" is left out)
    small = ordered_dataset(None, synpo_like_files, COLUMNS, 0, 4, driver_max_bytes=used)
    large = ordered_dataset(None, synpo_like_files, COLUMNS, 0, 4, driver_max_bytes=used - 1)
    assert "Sort" not in str(small) and "Sort" in str(large)
    assert small.num_blocks() == 6 and small.take_batch(4, batch_format="pyarrow").column_names == COLUMNS


def test_every_epoch_has_its_own_permutation_on_either_path(ray_local, synpo_like_files):
    from selfalign_ray.train.order import _selected_bytes, epoch_datasets, order_key, train_dataset_name

    rows = _all_rows(synpo_like_files)
    names = [_name(r) for r in rows]
    used = _selected_bytes(None, synpo_like_files, COLUMNS)
    driver = [_read(ds) for ds in epoch_datasets(None, synpo_like_files, COLUMNS, 3, 4, epochs=3,
                                                  driver_max_bytes=used)]
    for epoch, order in enumerate(driver):
        assert order == [names[i] for i in sorted(range(len(rows)), key=lambda i: order_key(rows[i], 3, epoch))]
    assert driver[0] == _read(_driver(synpo_like_files, seed=3))  # epoch 0: the seed's permutation, as before
    assert len({tuple(o) for o in driver}) == 3                   # a new permutation each epoch
    # Ray Data's sort (a large set) gives epoch 1 the same permutation.
    ray_epochs = epoch_datasets(None, synpo_like_files, COLUMNS, 3, 4, epochs=2, driver_max_bytes=used - 1)
    assert _read(ray_epochs[1]) == driver[1]
    assert [train_dataset_name(e) for e in range(3)] == ["train", "train_epoch_1", "train_epoch_2"]


def test_removed_shuffle_buffer_key_is_a_clear_error():
    from selfalign_ray.train.trainer import as_train_config

    with pytest.raises(ConfigError, match=r"train\.shuffle_buffer_rows is no longer a setting: .*global permutation"):
        as_train_config({"shuffle_buffer_rows": 1000})
