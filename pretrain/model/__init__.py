"""The model families (TubeViT: sparse tubes, fixed position embedding, pre-LN ViT,
per-dataset heads), their registry of named sizes, model files and FLOP counting.

Imports neither Ray nor DeepSpeed.
"""
from pretrain.model.family import ModelConfig
from pretrain.model.flops import count_flops, count_params, gflops, param_breakdown
from pretrain.model.io import load_model, read_metadata, save_model, save_state_dict
from pretrain.model.registry import (SIZES, create_model, dense_baseline_config, list_models,
                                     model_config, model_from_config)
from pretrain.model.tubes import (
    TUBE_SETS,
    SparseTubeTokenizer,
    TubeSpec,
    count_tokens,
    image_grid,
    paper_tubes,
    resolve_tubes,
    video_grids,
)
from pretrain.model.tubevit import TubeViT, TubeViTConfig

__all__ = [
    "SIZES", "TUBE_SETS", "ModelConfig", "SparseTubeTokenizer", "TubeSpec", "TubeViT",
    "TubeViTConfig", "count_flops", "count_params", "count_tokens", "create_model",
    "dense_baseline_config", "gflops", "image_grid", "list_models", "load_model", "model_config",
    "model_from_config", "paper_tubes", "param_breakdown", "read_metadata", "resolve_tubes", "save_model", "save_state_dict",
    "video_grids",
]
