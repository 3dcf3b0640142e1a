"""How adapters are injected into a pipeline and how their modules are named."""
