"""`torchmdx bench`: not built yet."""

from torchmdx.errors import NotBuiltError

HELP = "(bench: not built yet)"


def add_arguments(parser):
    parser.add_argument("args", nargs="*", help="(ignored)")


def run(args):
    raise NotBuiltError("'torchmdx bench' is not built yet")
