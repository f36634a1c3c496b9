"""`torchmdx data`: not built yet."""

from torchmdx.errors import NotBuiltError

HELP = "(data: not built yet)"


def add_arguments(parser):
    parser.add_argument("args", nargs="*", help="(ignored)")


def run(args):
    raise NotBuiltError("'torchmdx data' is not built yet")
