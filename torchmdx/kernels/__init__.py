"""torchmdx.kernels"""
