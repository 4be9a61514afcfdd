"""Training recipes: SFT and DPO as readable sequences of steps over the layers below."""
