"""streamrnn: learn recurrent language models online from live token streams."""
from .config import Config, ConfigError, load_config
from .learner import LearnResult, Learner

__all__ = ["Config", "ConfigError", "LearnResult", "Learner", "load_config"]
__version__ = "0.1.0"
