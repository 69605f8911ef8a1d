"""The order in which training reads its rows: one seeded random permutation of the whole training set.

SAO shards arrive in chunk order and SynPO's cumulative set in iteration order (iter_1/added ... iter_k/added);
read as they are, an epoch would see iteration 1 first and the newest pairs last, when cosine has the learning
rate near zero. The SimPO reference (HF Trainer) shuffles the whole set; so do we, on the driver's Ray Data
plan, before the rows are split between the workers:

    read the files -> key = keyed BLAKE2b-64(seed, row contents) -> sort by key -> blocks of exactly
    `rows_per_block` rows -> (Ray Train) equal split between ranks, blocks dealt round-robin

Why a content hash and not random_shuffle(seed): Ray Data's seeded shuffle is a function of the block layout
(its map tasks are seeded per input block, and the number of read tasks follows the cluster's CPUs), so a restart
on a resized cluster could see a different order. The key here depends on the seed and the row alone: the
permutation is the same for any file layout, read parallelism or cluster, and on every resume (the worker skips
consumed micro-batches by count, so this matters). Rows with identical contents get identical keys; their relative
order is then invisible.

Why blocks of rows_per_block = per_device_batch_size x grad_accum: Ray's equal split (OutputSplitter, with
preserve_order) deals blocks to the rank with the fewest rows so far, i.e. round-robin for equal blocks; so rank r
takes blocks r, r + W, r + 2W, ... and optimizer step k consumes rows k*G ... (k+1)*G - 1 of the permutation
(G = global batch), as torch's DistributedSampler would. Block sizes fixed by the row count (not by the sort's
randomly sampled range boundaries) make that assignment deterministic too.

Where the sort runs: a training set whose used columns are small (`DRIVER_ORDER_MAX_BYTES`, uncompressed, from the
Parquet footers) is read, keyed and sorted by pyarrow on the driver and handed to Ray Train as blocks already of
`rows_per_block` rows; a larger one goes through Ray Data's distributed sort. Same keys, same order, same blocks:
only the cost differs. Ray Data's sort samples the input (one more read), then shuffles it through map and reduce
tasks: on a 2-CPU machine about 9 s for 12 rows alone, and 20-30 s before the first optimizer step when the
training workers hold the CPUs; the driver's sort of the same rows takes milliseconds.

One permutation serves every epoch (Ray Train re-executes the same plan each epoch): reshuffling per epoch
would need one dataset per epoch. With the default SimPO runs (1 epoch) this is moot; SFT's 3 epochs see the
same shuffled order three times.
"""

from __future__ import annotations

import hashlib
import json

ORDER_KEY = "__selfalign_order_key"
# Up to this many uncompressed bytes of used columns, the permutation is made on the driver (see above): at
# paper scale (60k pairs of a few KB) that is the common case; the driver holds the table once while it sorts.
DRIVER_ORDER_MAX_BYTES = 256 * 2**20


def order_key(row: dict, seed: int) -> int:
    """The sort key of one row: an unsigned 64-bit keyed hash of its canonical JSON (column order ignored)."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=f"selfalign-order:{int(seed)}".encode())
    return int.from_bytes(digest.digest(), "big")


def _add_key(seed: int):
    def add(table):
        import pyarrow as pa

        keys = [order_key(row, seed) for row in table.to_pylist()]
        return table.append_column(ORDER_KEY, pa.array(keys, type=pa.uint64()))

    return add


def global_order(ds, seed: int, rows_per_block: int):
    """`ds` in the seeded permutation of its rows, cut into blocks of exactly `rows_per_block` rows (the last
    may be shorter). Pass the result to Ray Train with preserve_order=True (trainer.train_model does)."""
    if rows_per_block <= 0:
        raise ValueError(f"rows_per_block must be positive, got {rows_per_block}")
    keyed = ds.map_batches(_add_key(seed), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    return (keyed.sort(ORDER_KEY).drop_columns([ORDER_KEY])
            .repartition(target_num_rows_per_block=rows_per_block, strict=True))


def _selected_bytes(fs, paths: list[str], columns: list[str]) -> int:
    """Uncompressed bytes of `columns` in the Parquet files (their footers only)."""
    import pyarrow.parquet as pq

    total, wanted = 0, set(columns)
    for path in paths:
        meta = pq.read_metadata(path, filesystem=fs)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            # a nested field's column path ("chosen.list.element.content") starts with its column's name
            total += sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                         if group.column(c).path_in_schema.split(".")[0] in wanted)
    return total


def driver_order(fs, paths: list[str], columns: list[str], seed: int, rows_per_block: int):
    """The permutation made on the driver: the files' `columns` read with pyarrow, sorted by `order_key`, cut
    into blocks of `rows_per_block` rows: the rows and blocks `global_order` makes, without Ray Data's sort."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    if rows_per_block <= 0:
        raise ValueError(f"rows_per_block must be positive, got {rows_per_block}")
    table = pa.concat_tables([pq.read_table(p, filesystem=fs, columns=columns) for p in paths],
                             promote_options="permissive")
    keys: list[int] = []
    for batch in table.to_batches(max_chunksize=1024):  # bounded Python objects at a time
        keys += [order_key(row, seed) for row in batch.to_pylist()]
    table = table.take(pa.array(sorted(range(len(keys)), key=keys.__getitem__), type=pa.int64()))
    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks or [table])


def ordered_dataset(fs, paths: list[str], columns: list[str], seed: int, rows_per_block: int,
                    driver_max_bytes: int = DRIVER_ORDER_MAX_BYTES):
    """The training rows of `paths` (on filesystem `fs`, None = local) in the seeded permutation, in blocks of
    `rows_per_block` rows: sorted on the driver when the used columns take at most `driver_max_bytes`, by Ray
    Data's distributed sort otherwise (module docstring)."""
    import ray

    if _selected_bytes(fs, paths, columns) <= driver_max_bytes:
        return driver_order(fs, paths, columns, seed, rows_per_block)
    return global_order(ray.data.read_parquet(paths, filesystem=fs).select_columns(columns), seed, rows_per_block)
