"""torchmdx.md"""
