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
import importlib.util
import sys
import types

# `import streaming` (even `from streaming.base... import`, which runs the package's
# __init__ first) also imports the dataset classes streaming bundles: streaming.text (C4's
# AutoTokenizer pulls in transformers' generation code, scikit-learn and torch._dynamo),
# streaming.vision (torchvision) and streaming.multimodal. That costs ~7 CPU-s in every
# process that reads shards (each training worker, each prepare task), three times what the
# MDS reader and writer we use cost, and a run's workers start on the same cores as its
# other processes. We use none of those classes, so the three subpackages are registered as
# empty modules before streaming is first imported. streaming's own code never imports them
# (its __init__ only re-exports them); an attribute read from them fails loudly.
_UNUSED_STREAMING_PACKAGES = ("streaming.text", "streaming.vision", "streaming.multimodal")


def _skip_unused_streaming_packages() -> None:
    if "streaming" in sys.modules or importlib.util.find_spec("streaming") is None:
        return   # imported already (nothing to save), or not installed (the import will say)
    for name in _UNUSED_STREAMING_PACKAGES:
        sys.modules.setdefault(name, types.ModuleType(
            name, f"not imported by pretrain.data: {__name__} skips streaming's bundled datasets"))


_skip_unused_streaming_packages()
