"""Flax NNX models for fedjax_fm (installed as `fedjax_fm.models`)."""

from fedjax_fm.models.adapters import AdapterConfig, BottleneckAdapter, LoRA, LoRAConfig
from fedjax_fm.models.cnn import MLP, SimpleCNN
from fedjax_fm.models.decoder import DecoderConfig, DecoderLM
from fedjax_fm.models.decoder_generate import generate
from fedjax_fm.models.decoder_lora import DecoderLoRAConfig, decoder_roles
from fedjax_fm.models.decoder_loss import causal_lm_loss
from fedjax_fm.models.decoder_pretrained import from_pretrained_decoder
from fedjax_fm.models.embedders import (ImageTokenEmbeddings, PatchEmbeddings, TextEmbeddings,
                                        VisionTextEmbeddings)
from fedjax_fm.models.heads import (AnswerScoringHead, ClassificationHead, DensePredictionHead,
                                    ImageReconstructionHead, TokenPredictionHead, build_head)
from fedjax_fm.models.partitioning import param_shardings, shard_params
from fedjax_fm.models.pretrained import config_from_hf, from_pretrained
from fedjax_fm.models.tasks import classification_loss, functional
from fedjax_fm.models.tap import PairSpec, TAPConfig, TAPModel, TaskSpec, tap_from_pretrained
from fedjax_fm.models.transformer import (BACKBONE_PATTERN, Encoder, TransformerConfig,
                                          TransformerModel, parameter_component,
                                          transformer_roles)

__all__ = [
    "AdapterConfig", "AnswerScoringHead", "BACKBONE_PATTERN", "BottleneckAdapter",
    "ClassificationHead", "DecoderConfig", "DecoderLM", "DecoderLoRAConfig",
    "DensePredictionHead", "Encoder", "ImageReconstructionHead",
    "ImageTokenEmbeddings", "LoRA",
    "LoRAConfig", "MLP", "PatchEmbeddings", "SimpleCNN", "TextEmbeddings", "TokenPredictionHead",
    "TransformerConfig", "TransformerModel", "VisionTextEmbeddings", "build_head",
    "causal_lm_loss", "classification_loss", "config_from_hf", "decoder_roles",
    "from_pretrained", "from_pretrained_decoder", "functional", "generate",
    "param_shardings", "parameter_component", "shard_params", "transformer_roles",
]
