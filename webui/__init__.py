"""sd-lora web UI (Gradio): dataset captioning, training jobs that survive a page refresh, generation
with LoRA stacks, and a LoRA library. Start it with `sd-lora ui`; see docs/webui.md.

It calls only sd_lora's public API; training runs in its own process (webui.jobs)."""
