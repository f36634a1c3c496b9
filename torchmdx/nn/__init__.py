"""torchmdx.nn"""
