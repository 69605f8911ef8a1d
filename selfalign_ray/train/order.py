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

One permutation serves every epoch (Ray Train re-executes the same plan each epoch): reshuffling per epoch
would need one dataset per epoch. With the default SimPO runs (1 epoch) this is moot; SFT's 3 epochs see the
same shuffled order three times.
"""

from __future__ import annotations

import hashlib
import json

ORDER_KEY = "__selfalign_order_key"


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
