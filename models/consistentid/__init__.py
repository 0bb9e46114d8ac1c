"""ConsistentID (JackAILab/ConsistentID): released weights, facial-region prompts, ID tokens and the
delayed merge, on ComfyUI's own CLIP, CLIP vision and UNet."""
