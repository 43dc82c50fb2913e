from __future__ import annotations

from themask.loss.config import LossConfig
from themask.modeling.config import ModelConfig


def test_model_config_defaults_match_paper():
    cfg = ModelConfig()
    assert cfg.num_queries == 100 and cfg.decoder_layers == 9 and cfg.hidden_dim == 256
    assert not hasattr(cfg, "loss")  # the network config describes the network only
    assert LossConfig().num_rounds == 2
