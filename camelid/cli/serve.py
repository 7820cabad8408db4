"""camelid serve (being built)."""

from camelid.errors import CamelidError


def add_arguments(p):
    pass


def main(args):
    raise CamelidError("camelid serve is not built yet")
