"""Persistence: the stratalign store, one folder (a local path or any fsspec URL) a whole team shares.

Only this package knows the layout below; everything else asks a store object or a function here for an
artifact by name or key. Layout under the store root:

    zarr.json                          root group; attrs["stratalign"] marks a stratalign store + format version
    datasets/<name>/dataset.json       dataset meta (fingerprints, source, classes, skipped rows); written last
    datasets/<name>/images.parquet     image table (rows = image feature rows)
    datasets/<name>/captions.parquet   caption table (rows = caption feature rows)
    features/<entry key>/              one Zarr group per (dataset content, encoder, pooling, dtype)
        zarr.json                      group metadata; attrs["stratalign_entry"] is the entry's spec
        layer_000 ... layer_NNN        (rows, dim_l) arrays; layout 1: one crc32c-checked chunk per shard; layout 2
                                       (new entries): one Zarr shard per extraction shard, inner chunks of 4 rows
                                       with a crc32c each, read by byte range (store.shard_format)
        _shards/<s>.json               completion marker: row range + sha256 of each layer's shard bytes
        _claims/<s>.json               a worker's claim on a shard while it encodes it (host, pid, process start,
                                       heartbeat); an unreadable or dead one is stale (`store unlock`, `store gc`)
    <file>.tmp-<pid>[-<thread>]        a write in progress; a dead writer's is removed by the next writer of its
                                       folder and by `store gc` (store.cleanup)
    prompts/<key>.safetensors          zero-shot prompt features of one text entry's encoder + pooling
    extract_records/<key>.json         an extraction request's complete entries + the encoder's cheap identity
    runs/<run id>/config.json          a trained run's resolved config
    runs/<run id>/weights.safetensors  its head weights (never pickle)
    runs/<run id>/metrics.json         training summary + evaluation; written last: marks the run done
    runs/<run id>/eval-<dataset>.json  its evaluation on another dataset, with that dataset's fingerprint, the
                                       overlap with its training pairs and the metrics on the unseen pairs
    runs/<run id>/queries.safetensors  per-query hits on its own test split (paired comparisons); recomputable
    runs/<run id>/tuning-<key>.json    a validation grid this run was chosen from (tune): points, run ids, values
    layers/<key>.json, <key>.png       layer-similarity results and their heatmaps
    choices/<dataset>--<v>--<t>.json   the recorded layer choice for `train --layers auto`
    graphs/<key>.safetensors           cached kNN graphs of clip+structure-knn subsets
    indexes/<key>/index.faiss, .json   FAISS search index of a dataset in a run's space (store.indexes); reusable
    onnx/<key>/model.onnx, onnx.json   an ONNX graph of a run's query part (a text tower cut at its layer, + its
                                       tokenizer.json; a head), with the sha256 of its files (store.onnx_cache);
                                       recomputable: `search` and `serve` export it again when absent or damaged
    _migrate/<key>/                    transient: `store migrate` builds an entry's layout-2 copy here, then swaps it in

Modules: location (where a store lives, safe keys), keys (every content address), features (FeatureStore),
entry (EntrySpec, FeatureEntry), claims (shard claims and heartbeats), datasets (PairDataset, validation,
fingerprints), raw_records (a source's records as columnar batches), dataset_tables (a dataset's files), media
(images), prompt_cache, extract_records, runs (RunRegistry), layer_results, graphs, cleanup (temp files of dead
writers), verify (what `stratalign store verify` checks: datasets, entries and their keys, shard markers, claims,
runs, prompt caches, layer results and choices, graphs), shard_format (layout 2's shard files), inventory (every
artifact with its size and orphan status: `store ls | rm`), indexes (search indexes), onnx_cache (query graphs),
exports (an exported model folder, outside the store), migrate (layout-1 entries rewritten as layout 2 under their
keys: `store migrate`).

A local store never follows a symlink out of its root (Location.path refuses it in one line), so a crafted
store cannot make a command read, write or delete elsewhere.

Keys are content addresses (store.keys): a hash of everything that determines the bytes (for an entry:
dataset name and content fingerprint, encoder identity and weights hash, preprocessing, pooling, dtype, shard
size, entry layout), so changing any input makes a new key and never a stale hit. A new extraction writes
layout 2 but reuses a complete entry of the same content in layout 1 (`FeatureStore.reusable_twin`).
"""
