"""The model families (TubeViT: sparse tubes, fixed position embedding, pre-LN ViT,
per-dataset heads; VideoMAE: dense cubes, plain ViT; ViViT models 1-3 and TimeSformer:
dense tubelets, joint / factorised / divided space-time attention; VTN: a frame ViT and a
Longformer temporal encoder), their registry of named sizes, the
masked autoencoder around either (mae.py, masks in masking.py), model files and FLOP counting.

Imports neither Ray nor DeepSpeed.
"""
from pretrain.model.family import ModelConfig
from pretrain.model.flops import count_flops, count_masked_flops, count_params, gflops, param_breakdown
from pretrain.model.mae import DecoderConfig, MaskedAutoencoder, MaskedAutoencoderConfig
from pretrain.model.masking import MASK_SCHEMES, mask_tokens
from pretrain.model.io import load_model, read_metadata, save_model, save_state_dict
from pretrain.model.registry import (SIZES, VIDEOMAE_SIZES, VIVIT_SIZES, VTN_SIZES, create_model, dense_baseline_config,
                                     family_key, list_models, model_config, model_from_config,
                                     stored_config)
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
from pretrain.model.videomae import VideoMAE, VideoMAEConfig
from pretrain.model.vivit import (TimeSformer, TimeSformerConfig, ViViT, ViViTConfig, ViViTFE, ViViTFEConfig,
                                  ViViTFSA, ViViTFSAConfig)
from pretrain.model.vtn import VTN, VTNConfig
from pretrain.model.frame_average import frame_average

__all__ = [
    "MASK_SCHEMES", "VIDEOMAE_SIZES", "DecoderConfig", "MaskedAutoencoder", "MaskedAutoencoderConfig",
    "VideoMAE", "VideoMAEConfig", "count_masked_flops", "family_key", "mask_tokens", "stored_config",
    "SIZES", "TUBE_SETS", "ModelConfig", "SparseTubeTokenizer", "TubeSpec", "TubeViT",
    "TubeViTConfig", "count_flops", "count_params", "count_tokens", "create_model",
    "dense_baseline_config", "gflops", "image_grid", "list_models", "load_model", "model_config",
    "model_from_config", "paper_tubes", "param_breakdown", "read_metadata", "resolve_tubes", "save_model", "save_state_dict",
    "video_grids", "VIVIT_SIZES", "TimeSformer", "TimeSformerConfig", "ViViT", "ViViTConfig", "ViViTFE",
    "ViViTFEConfig", "ViViTFSA", "ViViTFSAConfig", "VTN", "VTNConfig", "VTN_SIZES", "frame_average",
]
