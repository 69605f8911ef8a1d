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

Every epoch has its own permutation, as the reference's sampler reshuffles each epoch: the trainer hands Ray Train
one dataset per epoch (`train`, `train_epoch_1`, ...; Ray Train would re-run one plan, i.e. repeat one order),
keyed by (seed, epoch) for epochs after the first; epoch 0's key is the seed alone. On the driver path the table
is read once and sorted once per epoch (the object store holds one copy per epoch: SimPO runs 1, SFT 3).
"""

from __future__ import annotations

import hashlib
import json

ORDER_KEY = "__selfalign_order_key"
# Up to this many uncompressed bytes of used columns, the permutation is made on the driver (see above): at
# paper scale (60k pairs of a few KB) that is the common case; the driver holds the table once while it sorts.
DRIVER_ORDER_MAX_BYTES = 256 * 2**20


def train_dataset_name(epoch: int) -> str:
    """The name of epoch `epoch`'s training dataset in Ray Train's `datasets` (the worker reads it by name)."""
    return "train" if epoch == 0 else f"train_epoch_{epoch}"


def _hash_key(seed: int, epoch: int) -> bytes:
    return (f"selfalign-order:{int(seed)}" if epoch == 0 else f"selfalign-order:{int(seed)}:epoch:{int(epoch)}").encode()


def order_key(row: dict, seed: int, epoch: int = 0) -> int:
    """The sort key of one row in epoch `epoch`: an unsigned 64-bit keyed hash of its canonical JSON (column order
    ignored), keyed by the seed (and the epoch after the first)."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=_hash_key(seed, epoch))
    return int.from_bytes(digest.digest(), "big")


def _add_key(seed: int, epoch: int = 0):
    def add(table):
        import pyarrow as pa

        keys = [order_key(row, seed, epoch) for row in table.to_pylist()]
        return table.append_column(ORDER_KEY, pa.array(keys, type=pa.uint64()))

    return add


def global_order(ds, seed: int, rows_per_block: int, epoch: int = 0):
    """`ds` in the seeded permutation of its rows for `epoch`, cut into blocks of exactly `rows_per_block` rows
    (the last may be shorter). Pass the result to Ray Train with preserve_order=True (trainer.train_model does)."""
    if rows_per_block <= 0:
        raise ValueError(f"rows_per_block must be positive, got {rows_per_block}")
    keyed = ds.map_batches(_add_key(seed, epoch), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
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


def _read_table(fs, paths: list[str], columns: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p, filesystem=fs, columns=columns) for p in paths],
                            promote_options="permissive")


def _sorted_blocks(table, seed: int, rows_per_block: int, epoch: int):
    import pyarrow as pa
    import ray

    if rows_per_block <= 0:
        raise ValueError(f"rows_per_block must be positive, got {rows_per_block}")
    keys: list[int] = []
    for batch in table.to_batches(max_chunksize=1024):  # bounded Python objects at a time
        keys += [order_key(row, seed, epoch) for row in batch.to_pylist()]
    ordered = table.take(pa.array(sorted(range(len(keys)), key=keys.__getitem__), type=pa.int64()))
    blocks = [ordered.slice(i, rows_per_block) for i in range(0, ordered.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks or [ordered])


def driver_order(fs, paths: list[str], columns: list[str], seed: int, rows_per_block: int, epoch: int = 0):
    """The permutation made on the driver: the files' `columns` read with pyarrow, sorted by `order_key`, cut
    into blocks of `rows_per_block` rows: the rows and blocks `global_order` makes, without Ray Data's sort."""
    return _sorted_blocks(_read_table(fs, paths, columns), seed, rows_per_block, epoch)


def epoch_datasets(fs, paths: list[str], columns: list[str], seed: int, rows_per_block: int, epochs: int,
                   driver_max_bytes: int = DRIVER_ORDER_MAX_BYTES) -> list:
    """The training rows of `paths` (on filesystem `fs`, None = local), one dataset per epoch, each in that
    epoch's seeded permutation in blocks of `rows_per_block` rows: sorted on the driver when the used columns take
    at most `driver_max_bytes` (the table read once), by Ray Data's distributed sort otherwise (module docstring)."""
    import ray

    if _selected_bytes(fs, paths, columns) <= driver_max_bytes:
        table = _read_table(fs, paths, columns)
        return [_sorted_blocks(table, seed, rows_per_block, e) for e in range(epochs)]
    return [global_order(ray.data.read_parquet(paths, filesystem=fs).select_columns(columns), seed, rows_per_block, e)
            for e in range(epochs)]


def ordered_dataset(fs, paths: list[str], columns: list[str], seed: int, rows_per_block: int,
                    driver_max_bytes: int = DRIVER_ORDER_MAX_BYTES):
    """Epoch 0's dataset of `epoch_datasets`."""
    return epoch_datasets(fs, paths, columns, seed, rows_per_block, 1, driver_max_bytes)[0]
