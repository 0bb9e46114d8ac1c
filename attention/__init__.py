"""The mathematics of the pack in plain torch: no ComfyUI, no files, no block names."""
