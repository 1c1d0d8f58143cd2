"""streamrnn: learn recurrent language models online from live token streams."""
from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "LearnResult", "Learner", "load_config"]
__version__ = "0.3.0"


def __getattr__(name: str):
    # torch loads in seconds: import it when a Learner is wanted, not for `--help`
    if name in ("Learner", "LearnResult"):
        from .core import learner
        return getattr(learner, name)
    raise AttributeError(f"module 'streamrnn' has no attribute {name!r}")
