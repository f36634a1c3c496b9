"""torchmdx.train"""
