"""torchmdx.data"""
