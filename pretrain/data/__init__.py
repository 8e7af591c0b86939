"""Data: prepared MDS shards, clip decoding, joint image+video streaming that resumes exactly.

Import what you need from its module (importing this package stays cheap, so that
`pretrain --help` does not load streaming or PyAV):
    pretrain.data.config     DataConfig, SyntheticConfig (config section `data`)
    pretrain.data.metadata   DataInfo (the datasets' metadata, read once), ensure_datasets
    pretrain.data.loader     JointLoader, EvalLoader, Batch (training / eval loaders)
    pretrain.data.shards     dataset_info(uri): one prepared dataset's description
    pretrain.data.synthetic  prepare_synthetic(out_uri, videos, images, seed=0, ...)
    pretrain.data.prepare    prepare(kind, items, out_uri, ...)
    pretrain.data.prepare_ray  the same prepare as Ray tasks over manifest chunks (`--ray`)
    pretrain.data.transcode  the training storage format `pretrain prepare` writes by default
    pretrain.data.decode_rate  clips/s per core of a prepared dataset (`pretrain plan`)
"""
