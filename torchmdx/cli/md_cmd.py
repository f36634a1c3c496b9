"""`torchmdx md`: not built yet."""

from torchmdx.errors import NotBuiltError

HELP = "(md: not built yet)"


def add_arguments(parser):
    parser.add_argument("args", nargs="*", help="(ignored)")


def run(args):
    raise NotBuiltError("'torchmdx md' is not built yet")
