"""FlashFace (ali-vilab/FlashFace): its released weights in ComfyUI names and the objects built from them."""
