"""`torchmdx evaluate`: not built yet."""

from torchmdx.errors import NotBuiltError

HELP = "(evaluate: not built yet)"


def add_arguments(parser):
    parser.add_argument("args", nargs="*", help="(ignored)")


def run(args):
    raise NotBuiltError("'torchmdx evaluate' is not built yet")
