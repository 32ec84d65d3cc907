"""Persistence: the stratalign store, one folder (a local path or any fsspec URL) a whole team shares.

Only this package knows the layout below; everything else asks a store object or a function here for an
artifact by name or key. Layout under the store root:

    zarr.json                          root group; attrs["stratalign"] marks a stratalign store + format version
    datasets/<name>/dataset.json       dataset meta (fingerprints, source, classes, skipped rows); written last
    datasets/<name>/images.parquet     image table (rows = image feature rows)
    datasets/<name>/captions.parquet   caption table (rows = caption feature rows)
    features/<entry key>/              one Zarr group per (dataset content, encoder, pooling, dtype)
        zarr.json                      group metadata; attrs["stratalign_entry"] is the entry's spec
        layer_000 ... layer_NNN        (rows, dim_l) arrays, one row-chunk per shard, crc32c-checksummed
        _shards/<s>.json               completion marker: row range + sha256 of each layer's shard bytes
        _claims/<s>.json               a worker's claim on a shard while it encodes it
    prompts/<key>.safetensors          zero-shot prompt features of one text entry's encoder + pooling
    extract_records/<key>.json         an extraction request's complete entries + the encoder's cheap identity
    runs/<run id>/config.json          a trained run's resolved config
    runs/<run id>/weights.safetensors  its head weights (never pickle)
    runs/<run id>/metrics.json         training summary + evaluation; written last: marks the run done
    runs/<run id>/eval-<dataset>.json  its evaluation on another dataset, with that dataset's fingerprint
    runs/<run id>/queries.safetensors  per-query hits on its own test split (paired comparisons); recomputable
    layers/<key>.json, <key>.png       layer-similarity results and their heatmaps
    choices/<dataset>--<v>--<t>.json   the recorded layer choice for `train --layers auto`
    graphs/<key>.safetensors           cached kNN graphs of clip+structure-knn subsets
    indexes/<key>/index.faiss, .json   FAISS search index of a dataset in a run's space (store.indexes); reusable

Modules: location (where a store lives, safe keys), keys (every content address), features (FeatureStore),
entry (EntrySpec, FeatureEntry), claims (shard claims and heartbeats), datasets (PairDataset, validation,
fingerprints), dataset_tables (a dataset's files), media (images), prompt_cache, extract_records, runs (RunRegistry),
layer_results, graphs, indexes (search indexes), exports (an exported model folder, outside the store),
verify (what `stratalign store verify` checks: datasets, entries, per-query files).

Keys are content addresses (store.keys): a hash of everything that determines the bytes (for an entry:
dataset name and content fingerprint, encoder identity and weights hash, preprocessing, pooling, dtype, shard
size, format version), so changing any input makes a new key and never a stale hit.
"""
