"""Image towers alone (task "vision-encoder": CLIP / SigLIP vision models, ViT): widthwise pruning and export."""
