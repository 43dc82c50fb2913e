from themask.loss.config import LossConfig
from themask.modeling.config import ModelConfig


def test_model_config_defaults_match_paper():
    cfg = ModelConfig()
    assert cfg.num_queries == 100 and cfg.decoder_layers == 9 and cfg.hidden_dim == 256
    assert isinstance(cfg.loss, LossConfig) and cfg.loss.num_rounds == 2
