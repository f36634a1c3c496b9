"""`torchmdx train`: not built yet."""

from torchmdx.errors import NotBuiltError

HELP = "(train: not built yet)"


def add_arguments(parser):
    parser.add_argument("args", nargs="*", help="(ignored)")


def run(args):
    raise NotBuiltError("'torchmdx train' is not built yet")
