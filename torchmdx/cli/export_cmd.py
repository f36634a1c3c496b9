"""`torchmdx export`: not built yet."""

from torchmdx.errors import NotBuiltError

HELP = "(export: not built yet)"


def add_arguments(parser):
    parser.add_argument("args", nargs="*", help="(ignored)")


def run(args):
    raise NotBuiltError("'torchmdx export' is not built yet")
