"""How adapters are injected into a pipeline and how their modules are named."""

from .config import NetworkConfig  # noqa: F401
from .inject import LoraNetwork, inject_network  # noqa: F401
